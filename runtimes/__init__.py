"""onnxruntime sessions, generation, evaluation and profiling.

Imports only onnxruntime, numpy and tokenizers (plus the standard library): this is what an app on
the device needs, and a test enforces that torch and transformers stay out.
"""
