"""Tiny random decoder models with a real (word-level) tokenizer, saved as HF folders. No network."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "the sky is blue because air scatters short light waves more than long ones explain in one "
    "sentence why a cat sat on mat and dog ran far away from home to see sea red green user assistant system"
).split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)) + [".", ",", "?", "\n"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(model_type: str = "llama", layers: int = 3, seed: int = 0, vocab_size: int = 64, hidden: int = 64,
               intermediate: int = 128):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[model_type]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=model_type == "llama",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init gives near-uniform logits; scale up so greedy choices are well separated.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def save_tiny_model(folder: Path, model_type: str = "llama", layers: int = 3, seed: int = 0, **sizes) -> Path:
    """`sizes`: hidden / intermediate widths (make_model's defaults otherwise)."""
    folder = Path(folder)
    model = make_model(model_type, layers, seed, **sizes)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def tiny_llama(layers: int = 4, seed: int = 0, hidden: int = 32, intermediate: int = 64):
    """A bare random Llama for PyTorch-side tests (attribution, plans): no tokenizer, no folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(layers: int = 3, seed: int = 0, biased: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")):
    """A bare random Qwen2; its q/k/v biases start at zero, so the `biased` ones get random values."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for name in biased:
                getattr(layer.self_attn, name).bias.normal_(0, 0.5)
    return model


def tiny_mistral(layers: int = 3, seed: int = 0):
    """A bare random Mistral (sliding-window attention config, no biases)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=16,
    )
    return MistralForCausalLM(config).eval()
