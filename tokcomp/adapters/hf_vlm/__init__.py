"""Hugging Face (transformers v5) vision-language models: LLaVA-1.5, LLaVA-NeXT (anyres), Qwen2-VL
and Qwen2.5-VL (multimodal RoPE), Idefics3 and SmolVLM, organised like the pipeline a forward
runs through:

- families/: one file per model family: where it keeps its parts, how its images become
  visual tokens, how it numbers positions, its geometry (VLMSpec);
- selection.py: each image's budget over its segments, the prompt's text for methods that
  condition on it (cdpruner), and the method's choice;
- sequence.py: the prompt, its packing without the pruned tokens, renumbered positions;
- generation.py: the record a pruned prefill leaves on the generation's cache and the
  translation of later calls;
- decoder.py: the decoder run span by span for LLM-stage methods (FastV);
- adapter.py: the patched forward that calls them in that order.

Visual-token methods (zoo, divprune, cdpruner, visionzip, random: before the language model;
fastv: inside it) choose per image which visual tokens the language model sees; the prompt is then
re-packed without the others, for any batch (left or right padding, kept on the caller's
side; prompts of different lengths, different numbers of images) and through generate's KV
cache. Block methods (tome, pitome,
...) act inside the vision tower of LLaVA-1.5 through the hf_vision adapter; the image's
tokens then take its first placeholders.

Positions. 1-D RoPE (LLaVA, LLaVA-NeXT, Idefics3, SmolVLM): the prompt's position ids (given,
as generate gives them, or the model's default) are gathered for the kept tokens
(positions="keep") or each token moves down by the pruned tokens before it ("renumber").
Multimodal RoPE (Qwen2-VL, Qwen2.5-VL): the (t, h, w) ids of the whole prompt come first
(given, or the model's get_rope_index), then the kept columns are gathered ("keep"), or the gap
each image's pruned extent leaves is closed for what follows ("renumber"; kept image tokens keep
their grid coordinates).

Logits and hidden states of a prefill cover the pruned prompt. Models are recognised by class
name, so `import tokcomp` does not import transformers.
"""

from tokcomp.adapters.hf_vlm.adapter import HFVLMAdapter
from tokcomp.adapters.hf_vlm.generation import visual_tokens_dropped

__all__ = ["HFVLMAdapter", "visual_tokens_dropped"]
