"""The Hugging Face boundary: what a model directory on the Hub holds and how it maps onto ours.

hub.py resolves a repo id or a path to a local directory and names its files; tensor_names.py says
where every checkpoint tensor lives in our fused parameters; pretrained.py loads and saves models
in safetensors shards; json_file.py and atomic_files.py read and write the files themselves.
The tokenizer files of a directory are read by the tokenizer package.

Nothing is imported here, so that reading a tokenizer (which uses hub.py) does not import torch.
"""
