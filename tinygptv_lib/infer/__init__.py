"""Inference: decoding (`infer.generate`: generate, stream_generate, build_prompt), box text
(`infer.boxes`), the `tinygptv chat` command (`infer.chat`).

Nothing is imported here, so `data.world` can re-export the box functions without loading torch.
"""
