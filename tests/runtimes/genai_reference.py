"""Greedy generation through onnxruntime-genai, the runtime other tools' users already have."""

from __future__ import annotations


def genai_greedy(folder, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], object]:
    """Tokens onnxruntime-genai generates after `prompt_ids` (it stops at eos without returning it),
    and the prefill logits it computed."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    prefill_logits = generator.get_output("logits")
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt_ids):]], prefill_logits


def without_eos(tokens: list[int], eos_ids) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos_ids else tokens
