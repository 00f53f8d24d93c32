"""Tiny random models of 30 transformers families, each saved as a safetensors folder with a real (BPE)
tokenizer laid out as its family lays one out: what the faithfulness matrix extracts through the stages.

Weights are random and then perturbed, so no parameter is trivially zero or one (a norm weight of 1 or a
bias of 0 would hide a wrong layer or a skipped norm)."""

from __future__ import annotations

from pathlib import Path

import torch

# family -> (config class, its own keyword arguments, tokenizer style). COMMON fills the rest, through each
# config's attribute map where its names differ (GPT-2's n_embd, DistilBERT's dim, ...).
COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=160)
DECODERS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=8)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=2, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=8, sliding_window=16)),
    "phi": ("PhiConfig", dict()),
    "phi3": ("Phi3Config", dict()),
    "gpt2": ("GPT2Config", dict(n_inner=64)),
    "gpt_neox": ("GPTNeoXConfig", dict()),
    "gptj": ("GPTJConfig", dict(rotary_dim=4, n_inner=64)),
    "opt": ("OPTConfig", dict(ffn_dim=64, word_embed_proj_dim=32)),
    "falcon": ("FalconConfig", dict()),
    "olmo2": ("Olmo2Config", dict(num_key_value_heads=2)),
    "granite": ("GraniteConfig", dict(num_key_value_heads=2)),
    "stablelm": ("StableLmConfig", dict(num_key_value_heads=2)),
    "starcoder2": ("Starcoder2Config", dict(num_key_value_heads=2)),
    "bloom": ("BloomConfig", dict()),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=32)),
}
ENCODERS = {
    "bert": ("BertConfig", dict(), "bert"),
    "distilbert": ("DistilBertConfig", dict(hidden_dim=64), "bert"),
    "deberta_v2": ("DebertaV2Config", dict(), "bert"),
    "electra": ("ElectraConfig", dict(embedding_size=24), "bert"),
    "modernbert": ("ModernBertConfig", dict(global_attn_every_n_layers=2, local_attention=8), "bert"),
    "roberta": ("RobertaConfig", dict(), "roberta"),
    "xlm_roberta": ("XLMRobertaConfig", dict(), "roberta"),
    "mpnet": ("MPNetConfig", dict(), "roberta"),
    "albert": ("AlbertConfig", dict(embedding_size=16, num_hidden_groups=1), "bert"),
}
FAMILIES = [*DECODERS, *ENCODERS]

# special tokens in vocabulary order, the template a single text gets, and which token pads
STYLES = {
    "bert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]", "[PAD]"),
    "roberta": (["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s> $A </s>", "<pad>"),
    "decoder": (["<pad>", "<unk>", "<bos>", "<eos>"], "<bos> $A", "<pad>"),
}


def make_tokenizer(texts: list[str], style: str, vocab_size: int = 400):
    """A byte-level BPE trained on `texts`, with the family's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials, template, pad = STYLES[style]
    tokenizer = Tokenizer(models.BPE(unk_token=specials[1] if style != "roberta" else "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    used = [token for token in template.split() if token != "$A"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, tokenizer.token_to_id(token)) for token in used])
    names = {"bert": dict(cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]"),
             "roberta": dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
                             unk_token="<unk>", mask_token="<mask>"),
             "decoder": dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")}[style]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, **names)


def make_config(family: str, tokenizer):
    import transformers
    if family in DECODERS:
        class_name, own = DECODERS[family]
    else:
        class_name, own, _ = ENCODERS[family]
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if family in DECODERS:
        ids.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    else:
        ids.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                   cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    return getattr(transformers, class_name)(**COMMON, **ids, **own)


def style_of(family: str) -> str:
    return "decoder" if family in DECODERS else ENCODERS[family][2]


def make_family(family: str, texts: list[str], folder: Path, seed: int = 0) -> Path:
    """Save a tiny random `family` model (base model, no head) and its tokenizer into `folder`."""
    from transformers import AutoModel
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(texts, style_of(family))
    model = AutoModel.from_config(make_config(family, tokenizer), attn_implementation="eager")
    with torch.no_grad():
        for parameter in model.parameters():     # nothing trivially 0 or 1: norms, biases, padding rows
            parameter.add_(torch.randn_like(parameter) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
