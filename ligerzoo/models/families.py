"""The three families, each the shared decoder (transformer.py) with its feed-forward layer.

- Llama 2 and 3 (3.1, 3.2): dense SwiGLU MLPs. Grouped-query attention, tied embeddings,
  attention/MLP biases, a head_dim other than hidden/heads and Llama 3.1's `llama3` rope scaling
  all come from the config.
- Mistral: Llama's layout, with sliding-window attention when `config.sliding_window` is set and
  shorter than the sequence (part of the one mask predicate in attention.py; on the GPU a
  flex_attention block mask that skips the tiles outside the window).
- Mixtral: Mistral's attention with a sparse mixture of SwiGLU experts in place of the MLP, and
  the load-balancing loss added to the training loss.

Where each family's Hugging Face checkpoint names go is the business of hf/tensor_names.py.
"""

from ligerzoo.models.transformer import MLP, MoE, Transformer


class Llama(Transformer):
    feed_forward_class = MLP


class Mistral(Llama):
    pass


class Mixtral(Transformer):
    feed_forward_class = MoE


MODEL_CLASSES = {"llama": Llama, "mistral": Mistral, "mixtral": Mixtral}
