"""The input pipeline: sources, crops, skipped files, resumable iterator state, clear errors."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from nativetok_jax.config import base_config
from nativetok_jax.data.images import center_crop
from nativetok_jax.data.pipeline import SkippedImages, decode, eval_images, random_crop, train_iterator
from nativetok_jax.data.sources import DataError, FolderSource, open_sources


def data_config(**overrides) -> ml_collections.ConfigDict:
    data = base_config().data
    data.update(num_threads=1, **overrides)
    return data


def write_images(root, names, size=(40, 24)):
    rng = np.random.default_rng(0)
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(path)


def test_folder_source_finds_images_recursively_with_class_labels(tmp_path):
    write_images(tmp_path, ["cats/a.png", "cats/b.jpg", "dogs/c.webp", "dogs/deep/d.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    source = FolderSource.scan(str(tmp_path))
    assert len(source) == 4 and source.class_names == ["cats", "dogs", "dogs/deep"]
    assert [source[i]["label"] for i in range(4)] == [0, 0, 1, 2]


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    write_images(tmp_path, [f"ok{i}.png" for i in range(3)])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    skipped = SkippedImages()
    source = FolderSource.scan(str(tmp_path))
    iterator = train_iterator(data_config(), source, image_size=8, batch_size=4, seed=0, skipped=skipped)
    batches = [next(iterator) for _ in range(3)]
    assert all(b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.uint8 for b in batches)
    assert skipped.count >= 1 and "broken.jpg" in skipped.examples[0]


def test_an_unreadable_file_is_counted_and_warned_about_once(tmp_path, caplog):
    """Issue 17, case 3: one unreadable file among nine, 20 steps: one skipped image, one warning."""
    write_images(tmp_path, [f"ok{i}.png" for i in range(8)])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    skipped = SkippedImages()
    iterator = train_iterator(data_config(), FolderSource.scan(str(tmp_path)), image_size=8, batch_size=4, seed=0,
                              skipped=skipped)
    with caplog.at_level("WARNING"):
        for _ in range(20):  # about nine epochs: the broken file comes up again and again
            next(iterator)
    assert skipped.count == 1 and skipped.names == [str(tmp_path / "broken.jpg")]
    assert len(skipped.examples) == 1 and "broken.jpg" in skipped.examples[0]
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1


def test_symlinked_class_folders_are_followed_once_without_cycles(tmp_path, caplog):
    """Issue 17, case 2: a class folder that is a symbolic link is read like a real one."""
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    write_images(root, [f"cats/{i}.png" for i in range(4)])
    write_images(elsewhere, [f"dogs/{i}.jpg" for i in range(5)])
    (root / "dogs").symlink_to(elsewhere / "dogs", target_is_directory=True)
    (root / "cats" / "loop").symlink_to(root, target_is_directory=True)  # a cycle back to the top
    (root / "cats" / "again").symlink_to(elsewhere / "dogs", target_is_directory=True)  # a second way in
    (root / "gone.png").symlink_to(tmp_path / "no_such_file.png")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "cats" / "notes.txt").write_text("not an image")
    with caplog.at_level("INFO"):
        source = FolderSource.scan(str(root))
    assert len(source) == 9 and source.class_names == ["cats", "dogs"]
    assert [source[i]["label"] for i in range(9)] == [0] * 4 + [1] * 5
    assert source.skipped == {
        "hidden": [".DS_Store"],
        "broken link or not a file": ["gone.png"],
        "not an image file name": ["cats/notes.txt"],
        "folder already read through another link (or a link cycle)": ["cats/again", "cats/loop"],
    }
    assert "9 image files in 2 classes" in caplog.text and "skipped 5:" in caplog.text


def test_training_and_evaluation_read_a_sideways_phone_photo_upright(tmp_path):
    """Issue 17, case 1, through the pipeline: an 80 x 40 photo stored as 40 x 80 with EXIF orientation 6."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((80, 40, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    source = FolderSource.scan(str(tmp_path))
    assert decode(source[0]["image"], SkippedImages()).shape == (40, 80, 3)


def test_iterator_state_round_trips_to_the_same_batches():
    source, _ = open_sources(data_config(source="photos", crop_min=0.2, crop_max=0.5), 4)
    iterator = train_iterator(data_config(crop_min=0.2, crop_max=0.5), source, image_size=16, batch_size=3, seed=5)
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["image"] for _ in range(3)]
    fresh = train_iterator(data_config(crop_min=0.2, crop_max=0.5), source, image_size=16, batch_size=3, seed=5)
    fresh.set_state(state)
    for batch in expected:
        np.testing.assert_array_equal(next(fresh)["image"], batch)


def test_processes_read_disjoint_parts_of_the_data(tmp_path):
    write_images(tmp_path, [f"{i}.png" for i in range(6)])
    source = FolderSource.scan(str(tmp_path))

    def labels_seen(process):
        it = train_iterator(data_config(flip=False), source, image_size=8, batch_size=3, seed=0,
                            process_index=process, process_count=2)
        return {bytes(image) for image in next(it)["image"]}

    assert not labels_seen(0) & labels_seen(1)


def test_random_crop_and_centre_crop_sizes():
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    crop = random_crop(image, np.random.default_rng(1), 16, 0.2, 0.5, flip=True)
    assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8
    assert center_crop(image, 16).shape == (16, 16, 3)


def test_held_out_photographs_are_not_training_photographs():
    train, held_out = open_sources(data_config(source="photos"), 8)
    assert not {bytes(train[i]["image"][:4]) for i in range(len(train))} & {
        bytes(held_out[i]["image"][:4]) for i in range(len(held_out))
    }
    images = eval_images(data_config(source="photos", crop_min=0.2, crop_max=0.5), held_out, image_size=16,
                         num_images=8, seed=0)
    again = eval_images(data_config(source="photos", crop_min=0.2, crop_max=0.5), held_out, image_size=16,
                        num_images=8, seed=0)
    assert images.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(images, again)  # a fixed evaluation set


def test_held_out_crops_are_drawn_at_their_own_scale_when_it_is_set():
    """data.eval_crop_min / eval_crop_max: train at one scale, judge at another; unset (0, 0) they
    are the training crops' scale."""
    from nativetok_jax.data.pipeline import eval_crop_range

    assert eval_crop_range(data_config(crop_min=0.3, crop_max=0.7)) == (0.3, 0.7)
    data = data_config(source="photos", crop_min=0.05, crop_max=0.7, eval_crop_min=0.2, eval_crop_max=0.5)
    assert eval_crop_range(data) == (0.2, 0.5)
    held_out = open_sources(data_config(source="photos"), 8)[1]
    images = eval_images(data, held_out, image_size=16, num_images=8, seed=0)
    # The same draws as a run that trains and judges at 0.2-0.5 (the crops depend on the range only).
    same = eval_images(data_config(source="photos", crop_min=0.2, crop_max=0.5), held_out, image_size=16,
                       num_images=8, seed=0)
    np.testing.assert_array_equal(images, same)
    other = eval_images(data_config(source="photos", crop_min=0.05, crop_max=0.7), held_out, image_size=16,
                        num_images=8, seed=0)
    assert not np.array_equal(images, other)
    # The held-out token and latent stores crop the same way, unflipped; other sources whole.
    from nativetok_jax.data.pipeline import held_out_section

    section = held_out_section(data)
    assert (section.crop_min, section.crop_max, section.flip) == (0.2, 0.5, False)
    assert data.flip and (data.crop_min, data.crop_max) == (0.05, 0.7)  # the run's own section is left as it was
    folder = held_out_section(data_config(source="folder", crop_min=0.3, crop_max=0.6, eval_crop_min=0.2,
                                          eval_crop_max=0.5))
    assert (folder.crop_min, folder.crop_max, folder.flip) == (1.0, 1.0, False)


def test_folder_without_eval_path_holds_out_images_it_never_trains_on(tmp_path):
    write_images(tmp_path, [f"{i}.png" for i in range(10)])
    train, held_out = open_sources(data_config(source="folder", path=str(tmp_path)), 3)
    assert len(train) == 7 and len(held_out) == 3
    assert not set(train.paths) & set(held_out.paths)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(source="folder", path="/no/such/folder"), "config.data.path: image folder '/no/such/folder' does not exist"),
        (dict(source="folder", path="EMPTY"), "config.data.path: no jpg/jpeg/png/webp/bmp/gif/tif/tiff images under"),
        (dict(source="tfds", tfds_name=""), "config.data.tfds_name: must name a TFDS dataset"),
        (dict(source="tfds", tfds_name="no_such_dataset_xyz", tfds_data_dir="TMP"), "config.data.tfds_name: cannot open"),
    ],
)
def test_missing_or_empty_sources_are_one_line_errors(tmp_path, overrides, message):
    overrides = {k: (str(tmp_path) if v in ("EMPTY", "TMP") else v) for k, v in overrides.items()}
    with pytest.raises(DataError, match=message) as error:
        open_sources(data_config(**overrides), 4)
    assert "\n" not in str(error.value)


def test_tfds_dataset_is_read_as_a_random_access_source(tmp_path):
    import tensorflow_datasets as tfds

    class NativetokTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(5, 0), "validation": self._generate_examples(2, 1)}

        def _generate_examples(self, count, seed):
            rng = np.random.default_rng(seed)
            for i in range(count):
                yield i, {"image": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "label": i % 3}

    NativetokTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    data = data_config(source="tfds", tfds_name="nativetok_tiny_images", tfds_data_dir=str(tmp_path))
    train, held_out = open_sources(data, 2)
    assert (len(train), len(held_out)) == (5, 2)
    # Encoded bytes, decoded like files (EXIF orientation, depth, alpha) and named in skip reports.
    assert isinstance(train[1]["image"], bytes) and train[1]["name"] == "nativetok_tiny_images:train[1]"
    assert decode(train[1]["image"], SkippedImages(), train[1]["name"]).shape == (20, 30, 3)
    assert sorted(train[i]["label"] for i in range(5)) == [0, 0, 1, 1, 2]
    batch = next(train_iterator(data, train, image_size=8, batch_size=4, seed=0))
    assert batch["image"].shape == (4, 8, 8, 3)
    assert eval_images(data, held_out, image_size=8, num_images=2).shape == (2, 8, 8, 3)


@pytest.mark.parametrize("num_threads", [1, 4, 16])
def test_the_training_pipeline_keeps_every_reading_thread_busy_without_a_grain_warning(tmp_path, caplog, num_threads):
    write_images(tmp_path, [f"ok{i}.png" for i in range(4)])
    data = data_config()
    data.num_threads = num_threads  # the default is 4
    with caplog.at_level("WARNING"):
        iterator = train_iterator(data, FolderSource.scan(str(tmp_path)), image_size=8, batch_size=2, seed=0)
        next(iterator)
    assert "prefetch_buffer_size" not in caplog.text


def test_the_data_a_run_reads_is_named_with_its_split_sizes(tmp_path, caplog):
    import logging

    from nativetok_jax.data.sources import describe_data

    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    data = data_config(source="folder", path=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="absl"):
        train, held_out = open_sources(data, 64)
    described = describe_data(data, train, held_out)
    assert described == dict(
        source="folder", path=str(tmp_path), train_images=2, held_out_images=1,
        held_out_from="data.path: evenly spaced images, never trained on (data.eval_path names a folder of its own)")
    assert (f"data: folder ({tmp_path}): 2 training images, 1 held out from data.path: evenly spaced images, "
            "never trained on") in caplog.text
    photos = describe_data(data_config(), *open_sources(data_config(), 4))
    assert photos["source"] == "photos" and photos["path"] == "the photographs bundled with scikit-image"


@pytest.mark.parametrize("field, value, owner", [("path", "DIR", "folder"), ("eval_path", "DIR", "folder")])
def test_a_field_of_another_data_source_is_refused_in_one_line(field, value, owner):
    from nativetok_jax.config import ConfigError, validate_data_source

    data = data_config(**{field: value})  # data.source stays "photos"
    with pytest.raises(ConfigError, match=rf"^config.data.{field}: is read only when data.source is '{owner}', "
                                          rf"but data.source is 'photos': add --config.data.source={owner}"):
        validate_data_source(data)
    validate_data_source(data_config(source=owner, **{field: value}))


def test_permute_channels_gives_each_crop_its_channels_in_a_random_order(tmp_path):
    # A flat (200, 100, 0) image: every crop is flat, so each crop must be one of the six orders.
    Image.fromarray(np.broadcast_to(np.uint8([200, 100, 0]), (24, 24, 3)).copy()).save(tmp_path / "flat.png")
    source = FolderSource.scan(str(tmp_path))
    for permute in (False, True):
        batch = next(train_iterator(data_config(crop_min=0.5, crop_max=1.0, permute_channels=permute), source,
                                    image_size=8, batch_size=48, seed=0))["image"]
        assert (batch == batch[:, :1, :1]).all()  # still flat: a permutation, not a colour change
        orders = {tuple(int(v) for v in pixel) for pixel in batch[:, 0, 0]}
        assert orders == ({(200, 100, 0)} if not permute else
                          {(200, 100, 0), (200, 0, 100), (100, 200, 0), (100, 0, 200), (0, 200, 100), (0, 100, 200)})


def dominant_channel_shares(images: np.ndarray) -> np.ndarray:
    """The share of images whose mean colour is led by red, green, blue by at least 10 levels."""
    means = images.reshape(len(images), -1, 3).mean(1)
    leads = np.sort(means, axis=1)[:, 2] - np.sort(means, axis=1)[:, 1] >= 10
    return np.array([(leads & (means.argmax(1) == c)).mean() for c in range(3)])


def test_the_demo_trains_on_the_colours_of_its_held_out_photographs():
    """The bundled training photographs are half grey and hardly ever blue, while a quarter of the
    held-out crops (the rocket's sky) are blue: a tokenizer trained on them brought a blue sky back
    grey (issue 24). The demo's crops, channels permuted, contain every leading colour."""
    from nativetok_jax.config import load_config_file

    data = load_config_file("configs/demo.py").data
    data.num_threads = 1
    train, held_out = open_sources(data, 8)
    held_out_shares = dominant_channel_shares(eval_images(data, held_out, image_size=16, num_images=256, seed=0))
    assert held_out_shares[2] > 0.1  # the rocket's sky
    plain = data.copy_and_resolve_references()
    plain.permute_channels = False
    plain_shares = dominant_channel_shares(next(train_iterator(plain, train, image_size=16, batch_size=256, seed=0))["image"])
    assert plain_shares[2] < 0.02  # the defect: blue is (nearly) never the leading colour of a training crop
    shares = dominant_channel_shares(next(train_iterator(data, train, image_size=16, batch_size=256, seed=0))["image"])
    assert (shares > 0.05).all(), shares


def test_a_crop_of_a_photograph_in_memory_allocates_the_crop_not_the_photograph():
    """Each training crop of an in-memory photograph (the bundled photos, an array source) must
    cost what the crop costs: decoding copied the whole photograph per crop (4 MiB here for a
    32 px crop), 89 % of the demo's data time and 90 ms per batch of 32 on 2 cores."""
    import tracemalloc

    from nativetok_jax.data.pipeline import _Augment

    photo = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    data = ml_collections.ConfigDict(dict(crop_min=0.05, crop_max=0.2, flip=True, permute_channels=True))
    augment = _Augment(data, 32, SkippedImages())
    rng = np.random.default_rng(0)
    augment.random_map({"image": photo, "label": 0}, rng)  # warm PIL's lazy imports
    tracemalloc.start()
    try:
        for _ in range(4):
            out = augment.random_map({"image": photo, "label": 0}, rng)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["image"].shape == (32, 32, 3)
    assert peak < photo.nbytes / 8, f"{peak} bytes allocated for a crop of a {photo.nbytes}-byte photograph"


def test_a_small_dataset_is_shuffled_over_enough_copies_to_make_each_index_cheap():
    """grain's shuffle of n elements costs about 28 ms / n per index below 4096 elements (2.5 ms
    for the 11 bundled photographs, more than their crops): small datasets are shuffled as copies
    of themselves, each element still equally often in every shuffled block."""
    import grain

    from nativetok_jax.data.pipeline import MIN_SHUFFLE_DOMAIN, shuffled_forever

    for n in (11, 1000, 5000):
        dataset = shuffled_forever(grain.MapDataset.range(n), seed=3)
        (shuffle,) = dataset.parents
        assert len(shuffle) >= MIN_SHUFFLE_DOMAIN and len(shuffle) % n == 0
        block = np.array([dataset[i] for i in range(len(shuffle))])
        np.testing.assert_array_equal(np.bincount(block, minlength=n), np.full(n, len(shuffle) // n))
        assert not np.array_equal(block[:n], np.arange(n))
        next_block = np.array([dataset[len(shuffle) + i] for i in range(64)])
        assert not np.array_equal(next_block, block[:64])  # each epoch in another order
