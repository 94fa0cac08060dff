"""The launchers: what jax.distributed is given under SLURM (simulated environments, JAX's own
cluster detection), and the TPU pod script's commands against a stand-in gcloud."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI_GPU = os.path.join(ROOT, "launch", "multi_gpu.sh")
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")

# Stands in for `python -m nativetok_jax.main ...`: parses main's distributed flags and prints what
# main's jax.distributed.initialize() call would end up with, through the steps of jax 0.10's
# State.initialize (JAX_COORDINATOR_ADDRESS, JAX_LOCAL_DEVICE_IDS, then cluster auto-detection).
DISTRIBUTED_PROBE = '''
import json, os, sys
from jax._src import clusters

args = dict(a[2:].split("=", 1) for a in sys.argv[3:] if a.startswith("--") and "=" in a)
flags = [a for a in sys.argv[3:] if a.startswith("--") and "=" not in a]
coordinator = args.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
num_processes = int(args["num_processes"]) if "num_processes" in args else None
process_id = int(args["process_id"]) if "process_id" in args else None
local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
local = [int(i) for i in local.split(",")] if local else None
distributed = "--multihost" in flags or coordinator is not None
if distributed and None in (coordinator, num_processes, process_id, local):
    coordinator, num_processes, process_id, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        coordinator, num_processes, process_id, local, None, 300)
print(json.dumps(dict(module=sys.argv[2], distributed=distributed, coordinator=coordinator,
                      num_processes=num_processes, process_id=process_id, local_device_ids=local,
                      workdir=args.get("workdir"), config=args.get("config"), extra=sys.argv[3 + 2:])))
'''


def executable(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def probe(tmp_path):
    return executable(tmp_path / "python", f"#!{sys.executable}\n{DISTRIBUTED_PROBE}")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE", "CUDA_VISIBLE", "NUM_NODES",
                                "NODE_RANK", "COORDINATOR"))}
    env.update(extra)
    return env


def run_multi_gpu(probe, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", MULTI_GPU, *args], env=clean_env(PYTHON=probe, WORKDIR="/shared/run", **env),
                          capture_output=True, text=True, timeout=120, cwd="/tmp")


def slurm(procid: int, localid: int, ntasks: int, nodes: int = 2, gpus: str = "0,1,2,3,4,5,6,7") -> dict:
    """The variables srun sets for one task of a two-node job (job 4242 on gpu-node[07-08])."""
    return dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu-node[07-08]", SLURM_NTASKS=str(ntasks),
                SLURM_PROCID=str(procid), SLURM_LOCALID=str(localid), SLURM_STEP_NUM_NODES=str(nodes),
                SLURM_NNODES=str(nodes), CUDA_VISIBLE_DEVICES=gpus)


# jax picks the coordinator port from the job id: 4242 % 4096 + 61440.
COORDINATOR = "gpu-node07:61586"


@pytest.mark.slow
def test_slurm_one_task_per_node_drives_all_eight_gpus(probe):
    result = run_multi_gpu(probe, **slurm(procid=1, localid=0, ntasks=2))
    assert result.returncode == 0, result.stderr
    given = json.loads(result.stdout)
    assert given["distributed"] and given["module"] == "nativetok_jax.main"
    assert (given["coordinator"], given["num_processes"], given["process_id"]) == (COORDINATOR, 2, 1)
    assert given["local_device_ids"] == [0, 1, 2, 3, 4, 5, 6, 7]  # jax alone would give [0]


@pytest.mark.slow
def test_slurm_one_task_per_gpu_drives_its_own_gpu(probe):
    result = run_multi_gpu(probe, **slurm(procid=11, localid=3, ntasks=16))
    assert result.returncode == 0, result.stderr
    given = json.loads(result.stdout)
    assert (given["coordinator"], given["num_processes"], given["process_id"]) == (COORDINATOR, 16, 11)
    assert given["local_device_ids"] == [3]


@pytest.mark.slow
def test_slurm_gpus_per_task_one_uses_the_single_visible_gpu(probe):
    result = run_multi_gpu(probe, **slurm(procid=5, localid=5, ntasks=16, gpus="5"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["local_device_ids"] == [0]  # CUDA_VISIBLE_DEVICES=5 is device 0


@pytest.mark.slow
def test_slurm_two_tasks_per_node_split_the_gpus_in_halves(probe):
    result = run_multi_gpu(probe, **slurm(procid=3, localid=1, ntasks=4))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["local_device_ids"] == [4, 5, 6, 7]


@pytest.mark.slow
def test_slurm_tasks_that_cannot_share_the_gpus_stop_with_one_line(probe):
    result = run_multi_gpu(probe, **slurm(procid=0, localid=0, ntasks=6))  # 3 tasks per node, 8 GPUs
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip() == ("error: 3 SLURM tasks per node cannot share 8 visible GPUs evenly; "
                                     "use --ntasks-per-node=1 or --ntasks-per-node=8")


@pytest.mark.slow
def test_one_machine_starts_one_process_without_distributed_setup(probe):
    result = run_multi_gpu(probe, "--config.train.batch_size=512", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert result.returncode == 0, result.stderr
    given = json.loads(result.stdout)
    assert not given["distributed"] and given["local_device_ids"] is None
    assert given["workdir"] == "/shared/run" and given["config"] == "configs/nativetok.py:32"
    assert given["extra"] == ["--config.train.batch_size=512"]


@pytest.mark.slow
def test_manual_nodes_pass_the_coordinator_and_rank(probe):
    result = run_multi_gpu(probe, NUM_NODES="2", NODE_RANK="1", COORDINATOR="10.0.0.1:12345",
                           **slurm(procid=0, localid=0, ntasks=1))  # NUM_NODES wins over SLURM
    assert result.returncode == 0, result.stderr
    given = json.loads(result.stdout)
    assert (given["coordinator"], given["num_processes"], given["process_id"]) == ("10.0.0.1:12345", 2, 1)
    assert given["local_device_ids"] == list(range(8))  # all of the node's GPUs, not SLURM_LOCALID's


# Stands in for gcloud: records every call (one JSON list per line) and plays a slice of four
# workers. Training on worker $FAIL_WORKER fails after a second; the others train until stopped,
# or finish at once with FINISH=1.
FAKE_GCLOUD = r'''#!/usr/bin/env bash
printf '%s\n' "$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@")" >> "$CALLS"
worker=""; command=""
for arg in "$@"; do
  case "$arg" in --worker=*) worker="${arg#--worker=}" ;; --command=*) command="${arg#--command=}" ;; esac
done
case "$4" in
  describe) echo "10.0.0.1;10.0.0.2;10.0.0.3;10.0.0.4" ;;
  ssh)
    if [ "$worker" = all ]; then exit 0; fi
    echo "worker $worker: starting"
    if [ "$worker" = "${FAIL_WORKER:-}" ]; then sleep 1; echo "worker $worker: RuntimeError: out of memory"; exit 7; fi
    if [ -n "${FINISH:-}" ]; then echo "worker $worker: done"; exit 0; fi
    echo $$ > "$CALLS.worker-$worker.pid"
    exec sleep 120 ;;
esac
exit 0
'''


@pytest.fixture
def gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "gcloud", FAKE_GCLOUD)
    return dict(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls.jsonl"))


def run_tpu_pod(gcloud, tmp_path, *args, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    env.setdefault("PREFLIGHT", "0")  # its own tests below
    result = subprocess.run(["bash", TPU_POD, *args], env=clean_env(**gcloud, LOG_DIR=str(tmp_path / "logs"), **env),
                            capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    calls = []
    if os.path.exists(gcloud["CALLS"]):
        with open(gcloud["CALLS"]) as f:
            calls = [json.loads(line) for line in f]
    return result, calls


def option(call: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in call if arg.startswith(f"--{name}="))


@pytest.mark.slow
def test_tpu_pod_train_runs_every_worker_with_its_own_log_after_freeing_the_tpu(gcloud, tmp_path):
    result, calls = run_tpu_pod(gcloud, tmp_path, "train", "--config.train.batch_size=512",
                                WORKDIR="gs://bucket/nt32", FINISH="1")
    assert result.returncode == 0, result.stderr
    ssh = [c for c in calls if c[3] == "ssh"]
    assert sorted(option(c, "worker") for c in ssh) == ["0", "1", "2", "3"]  # from `describe`
    command = option(ssh[0], "command")
    assert command.index("sudo rm -f /tmp/libtpu_lockfile") < command.index("nativetok_jax.main")
    assert "sudo lsof -t /dev/accel*" in command
    assert (".venv/bin/python -m nativetok_jax.main --multihost --config=configs/nativetok.py:32 "
            "--workdir=gs://bucket/nt32 --config.train.batch_size=512") in command
    for worker in range(4):
        with open(tmp_path / "logs" / f"worker-{worker}.log") as f:
            assert f.read() == f"worker {worker}: starting\nworker {worker}: done\n"


@pytest.mark.slow
def test_tpu_pod_stops_every_worker_when_one_fails(gcloud, tmp_path):
    start = time.monotonic()
    result, calls = run_tpu_pod(gcloud, tmp_path, "train", WORKDIR="gs://bucket/nt32", FAIL_WORKER="2")
    assert result.returncode == 1
    assert time.monotonic() - start < 60  # the others train "forever" (120 s) unless stopped
    assert "error: worker 2 failed (exit 7); stopping the other workers" in result.stderr
    assert "worker 2: RuntimeError: out of memory" in result.stderr  # the failed worker's log tail
    stop = [c for c in calls if c[3] == "ssh" and option(c, "worker") == "all"]
    assert len(stop) == 1 and "sudo rm -f /tmp/libtpu_lockfile" in option(stop[0], "command")
    with open(tmp_path / "logs" / "worker-2.log") as f:
        assert "out of memory" in f.read()
    for worker in (0, 1, 3):  # their ssh sessions were ended, not left running
        with open(f"{gcloud['CALLS']}.worker-{worker}.pid") as f:
            with pytest.raises(ProcessLookupError):
                os.kill(int(f.read()), 0)


@pytest.mark.slow
def test_tpu_pod_train_refuses_a_workdir_the_workers_do_not_share(gcloud, tmp_path):
    result, calls = run_tpu_pod(gcloud, tmp_path, "train", WORKDIR="/home/me/run")
    assert result.returncode == 2 and calls == []
    assert result.stderr.strip() == "error: WORKDIR must be a gs:// path that all workers share (got '/home/me/run')"


@pytest.mark.slow
def test_tpu_pod_setup_installs_the_tested_versions_into_a_venv(gcloud, tmp_path):
    result, calls = run_tpu_pod(gcloud, tmp_path, "setup", NUM_WORKERS="4")
    assert result.returncode == 0, result.stderr
    scp, ssh = calls
    assert scp[3] == "scp" and option(scp, "worker") == "all" and scp[4].endswith("nativetok_jax.tar.gz")
    command = option(ssh, "command")
    assert "python3 -m venv .venv" in command
    assert ".venv/bin/pip install -q -e '.[tpu,gcs]' -c requirements.txt" in command
    assert "python3 -m pip" not in command  # the image's system Python is left alone


# Stands in for the local `python -m nativetok_jax.bench compile`: records its arguments (in
# $CALLS, like gcloud, so the order of the two is known) and answers as the command does when the
# config does not fit ($DOES_NOT_FIT) or fits.
FAKE_COMPILE = r'''#!/usr/bin/env bash
printf '%s\n' "$(python3 -c 'import json, sys; print(json.dumps(["python"] + sys.argv[1:]))' "$@")" >> "$CALLS"
if [ -n "${DOES_NOT_FIT:-}" ]; then
  echo "error: configs/nativetok.py:128 does not fit on v5e:4x4 at global batch 4096: needs 31.20 GiB per chip, the chip has 16 GiB" >&2
  exit 1
fi
echo "table"; echo "wrote preflight.json"
'''


@pytest.mark.slow
def test_tpu_pod_preflight_refuses_a_config_that_does_not_fit_before_any_tpu_vm_is_touched(gcloud, tmp_path):
    python = executable(tmp_path / "fake_python", FAKE_COMPILE)
    for command in (["train", "--config.train.batch_size=4096", "--config.data.source=tfds"], ["create"]):
        os.path.exists(gcloud["CALLS"]) and os.remove(gcloud["CALLS"])
        result, calls = run_tpu_pod(gcloud, tmp_path, *command, WORKDIR="gs://bucket/nt128", PREFLIGHT="1",
                                    PYTHON=python, CONFIG="configs/nativetok.py:128", DOES_NOT_FIT="1")
        assert result.returncode == 1 and [c[0] for c in calls] == ["python"]  # no gcloud call at all
        assert result.stderr.strip().splitlines()[-1] == (
            "error: configs/nativetok.py:128 does not fit on v5e:4x4 at global batch 4096: needs 31.20 GiB per chip, "
            "the chip has 16 GiB")
        compile_args = calls[0][1:]
        assert compile_args[:4] == ["-m", "nativetok_jax.bench", "compile", "--configs"]
        assert "--require_fit" in compile_args and "v5litepod-16" in compile_args  # the slice's type
    assert calls and "--accelerator_type" in calls[0]
    first = run_tpu_pod(gcloud, tmp_path, "train", "--config.train.batch_size=4096", "--config.data.source=tfds",
                        WORKDIR="gs://bucket/nt128", PREFLIGHT="1", PYTHON=python, DOES_NOT_FIT="1")[1][-1]
    sets = [first[i + 1] for i, arg in enumerate(first) if arg == "--set"]
    assert sets == ["train.batch_size=4096", "data.source=tfds"]  # train's config flags, compiled too


@pytest.mark.slow
def test_tpu_pod_preflight_that_fits_goes_on_to_train_and_topology_overrides(gcloud, tmp_path):
    python = executable(tmp_path / "fake_python", FAKE_COMPILE)
    result, calls = run_tpu_pod(gcloud, tmp_path, "train", WORKDIR="gs://bucket/nt32", FINISH="1", PREFLIGHT="1",
                                PYTHON=python, TOPOLOGY="v5e:4x4")
    assert result.returncode == 0, result.stderr
    assert calls[0][0] == "python" and calls[0][calls[0].index("--topology") + 1] == "v5e:4x4"
    assert "--accelerator_type" not in calls[0]
    assert sorted(option(c, "worker") for c in calls if c[3:4] == ["ssh"]) == ["0", "1", "2", "3"]
