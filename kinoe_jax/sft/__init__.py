"""Supervised fine-tuning on chat data: checks, token ids with the loss mask, seqio tasks, packing.

A line of SFT data is `{"messages": [{"role": ..., "content": ...}, ...]}`; the chat template
(kinoe_jax/data/chat/template.py) turns it into ids, and only assistant replies carry loss.
"""
