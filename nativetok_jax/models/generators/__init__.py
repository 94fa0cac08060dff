"""The second-stage generators over tokenizer ids: a LlamaGen-style GPT and a MaskGIT transformer."""
