"""Decoding from a multimodal prompt: greedy or sampled, batched (left-padded), streamed.

The prompt (its image embeddings spliced in) runs once; each new token then reuses the cached keys
and values (`use_cache=False` recomputes the whole sequence every step instead: the reference that
the cache must match, and the baseline of benchmarks/generation_kv.py). A row stops at EOS (50256)
or when its text contains a stop string ('###', TinyGPT-V's end symbol); the answer is the text
before the first stop string, stripped, as in the original demo.

Sampling follows the original demo's order (transformers' `generate`): repetition penalty, then
temperature, then nucleus (top-p). The penalty applies to the tokens generated so far only: the
original passes the prompt as embeddings, so transformers never sees its ids.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from ..model.sequence import PLACEHOLDER, TASK_IDS, build_prompt_batch
from . import lean_step

EOS_ID = 50256
STOP = "###"
IMAGE = f"<Img>{PLACEHOLDER}</Img>"
STAGE3_TEMPLATE = "###Human: {} ###Assistant: "  # stage 3 (instruction tuning)
STAGE4_TEMPLATE = "[INST] {} [/INST]"  # stage 4 (multi-task), MiniGPT-v2's chat template
TEMPLATES = {"stage3": STAGE3_TEMPLATE, "stage4": STAGE4_TEMPLATE}
TASKS = TASK_IDS  # the stage-4 task identifiers: vqa, caption, refer, identify, grounding, detection
# The original demo's sampling settings (answers vary from run to run there; here a seed fixes them).
DEMO_SAMPLING = {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.05}


def build_prompt(question: str, template: str = "stage4", task: Optional[str] = None, image: bool = True) -> str:
    """The prompt a stage was trained with: build_prompt('What colour?', 'stage4', 'vqa') ->
    '[INST] <Img><ImageHere></Img> [vqa] What colour? [/INST]'.

    `task` ('vqa' or '[vqa]') is a stage-4 identifier; stage 3 was trained without them, so asking
    for one there is an error rather than a prompt the model never saw.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {template!r}")
    question = question.strip()
    parts = []
    if image and PLACEHOLDER not in question:
        parts.append(IMAGE)
    if task:
        name = task.strip().strip("[]").strip()
        if name not in TASKS:
            raise ValueError(f"task must be one of {', '.join(f'[{t}]' for t in TASKS)}, got {task!r}")
        if template == "stage3":
            raise ValueError(f"task identifiers such as [{name}] belong to the stage-4 template; "
                             "stage 3 was trained without them")
        parts.append(f"[{name}]")
    if question:
        parts.append(question)
    if not parts:
        raise ValueError("empty prompt: no question and no image")
    return TEMPLATES[template].format(" ".join(parts))


@dataclass
class Generation:
    """What `generate` returns: per row the answer, the raw text, the new token ids (EOS not
    included) and why it stopped ('stop', 'eos' or 'length'); and the timings in seconds."""

    texts: list[str]
    raw: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    time_to_first_token: float = 0.0
    seconds: float = 0.0
    prompt_tokens: list[int] = field(default_factory=list)


def answer_text(raw: str, stop: Sequence[str] = (STOP,)) -> str:
    """The answer in a generated text: before the first stop string, stripped."""
    return raw[:_first_stop(raw, stop)].strip()


def _first_stop(text: str, stop: Sequence[str]) -> int:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else len(text)


def _visible(text: str, stop: Sequence[str]) -> str:
    """The part of a growing text that can be shown already: what follows may still turn its tail
    into a stop string, complete a multi-byte character, or prove trailing spaces inner ones."""
    cut = _first_stop(text, stop)
    if cut == len(text):
        hold = 0
        for s in stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        cut = len(text) - hold
    return text[:cut].rstrip("\ufffd").strip()


class _Streamer:
    """Turns the growing token list of one row into text pieces whose concatenation is the answer."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop, self.shown = tokenizer, tuple(stop), ""

    def push(self, tokens: list[int]) -> str:
        return self._advance(_visible(self.tokenizer.decode(tokens), self.stop))

    def finish(self, answer: str) -> str:
        return self._advance(answer)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


def _check_args(max_new_tokens, temperature, top_p, repetition_penalty) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def _penalise(logits: torch.Tensor, history: Optional[torch.Tensor], penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: seen tokens' logits are divided by it when positive, multiplied when negative."""
    if history is None or penalty == 1.0:
        return logits
    seen = logits.gather(1, history)
    return logits.scatter(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the more likely tokens
    drop = before >= top_p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def _next_tokens(logits, history, *, do_sample, temperature, top_p, repetition_penalty, generator):
    logits = _penalise(logits.float(), history, repetition_penalty)
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = _top_p_filter(logits / temperature, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def _as_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """weight.t().contiguous(), kept between calls while the weight is unchanged (a 52 MB copy costs
    tens of milliseconds, the time to first token itself). Any in-place update, such as an optimiser
    step or loading a state dict, bumps the tensor's version and makes a new copy; the copy goes
    when the weight does."""
    base = weight._base if weight._base is not None else weight
    return lean_step.kept(base, (weight.data_ptr(), tuple(weight.shape), weight._version),
                          lambda: weight.t().contiguous())


class _DecodeHead:
    """Phi's vocabulary head for decoding, at one position: logits over all rows, with the rows past
    the tokenizer (51,200 vs 50,295: padding, never a token) set to -inf, so sampling draws from
    the same distribution, with the same random numbers, as a plain `lm_head` would give.

    The head is read whole at every step, which makes it most of a small model's step. On a CPU,
    torch's `linear` with one or a few rows runs as a matrix-vector product at a fraction of memory
    speed (measured on the 2-core VM: 6.2 ms for a 51,200 x 256 fp32 head at batch 1, against 2.1 ms
    for the same product with the weight stored transposed, and 8.9 ms against 3.2 ms for `W @ h.T`
    at batch 8). Faster still with several threads: one row as a batch of 8 matrix-vector products
    over slices of the weight's rows (`bmm`), 1.1 ms at 2 threads (the transposed copy 2.1 ms); at one
    thread `bmm` loses (2.8 ms against 2.3). So on a CPU one row uses `bmm` with several threads and a
    transposed copy (kept while the weight is unchanged) with one; several rows use `W @ h.T`.
    Elsewhere it is `linear`. Same products, same values up to float rounding.
    """

    CHUNKS = 8

    def __init__(self, lm_head: torch.nn.Module, vocab: int):
        self.lm_head, self.vocab = lm_head, vocab
        # the fast path: a plain Linear on a CPU; anything else (a GPU, another kind of head) is called as is
        self.fast = isinstance(lm_head, torch.nn.Linear) and lm_head.weight.device.type == "cpu"
        self._transposed = None  # made on the first one-row step (several rows do not need it)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, width) -> logits (B, rows), a new tensor; rows from `vocab` on are -inf."""
        if not self.fast:
            logits = self.lm_head(hidden)
        else:
            weight, bias = self.lm_head.weight, self.lm_head.bias
            hidden = hidden.to(weight.dtype)
            if hidden.shape[0] == 1 and torch.get_num_threads() > 1 and weight.shape[0] % self.CHUNKS == 0:
                logits = lean_step.sliced_matvec(weight, hidden, self.CHUNKS)
            elif hidden.shape[0] == 1:
                if self._transposed is None:
                    self._transposed = _transposed(weight)
                logits = hidden @ self._transposed
            else:
                logits = (weight @ hidden.t()).t()
            if bias is not None:
                logits = logits + bias
        logits[:, self.vocab:] = float("-inf")
        return logits


@torch.no_grad()
def _decode(model, tokenizer, prompts: list[str], *, pixels, queries, image_embeds, max_new_tokens, do_sample,
            temperature, top_p, repetition_penalty, seed, generator, stop, eos_id, use_cache, state: dict):
    """The decoding loop, one yield per generated step; `state` holds the tokens and reasons so far."""
    _check_args(max_new_tokens, temperature, top_p, repetition_penalty)
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        device = next(model.phi.parameters()).device
        batch = build_prompt_batch(tokenizer, prompts, num_query_tokens=model.cfg.qformer.num_query_tokens).to(device)
        embeds = model.embed(batch, pixels=pixels, queries=queries, image_embeds=image_embeds)
        mask = batch.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        n = len(prompts)
        state.update(tokens=[[] for _ in range(n)], reasons=["length"] * n, first=0.0, t0=t0,
                     prompt_tokens=mask.sum(-1).tolist())
        if max_new_tokens == 0:
            return
        if do_sample and generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        vocab = len(tokenizer)  # rows past the tokenizer (51,200 vs 50,295) are padding, never a token
        embed_tokens = model.phi.get_input_embeddings()
        head = _DecodeHead(model.phi.lm_head, vocab)
        body = model.phi.model  # Phi without its head: the head runs on the last position only, below
        # Without left padding (one prompt, or prompts of one length) the mask is all ones and stays
        # so: leaving it out lets Phi skip building a mask every step, with the same result.
        padded = not bool(mask.all())
        out = body(inputs_embeds=embeds, attention_mask=mask if padded else None, position_ids=positions,
                   use_cache=use_cache)
        cache, lean = None, None
        if use_cache:  # transformers 5 names it `cache`; 4.x named it `past_key_values`
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            if max_new_tokens > 1:
                lean = lean_step.start(model.phi, cache, mask, max_new_tokens - 1)
        hidden = out.last_hidden_state[:, -1]
        done = [False] * n
        history = None
        texts = [""] * n
        for step in range(max_new_tokens):
            logits = head(hidden)
            nxt = _next_tokens(logits, history, do_sample=do_sample, temperature=temperature, top_p=top_p,
                               repetition_penalty=repetition_penalty, generator=generator)
            if step == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                state["first"] = time.perf_counter() - t0
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if eos_id is not None and t == eos_id:
                    done[i], state["reasons"][i] = True, "eos"
                    continue
                state["tokens"][i].append(t)
                if stop:
                    texts[i] = tokenizer.decode(state["tokens"][i])
                    if _first_stop(texts[i], stop) < len(texts[i]):
                        done[i], state["reasons"][i] = True, "stop"
            yield step
            if all(done) or step == max_new_tokens - 1:
                break
            history = nxt[:, None] if history is None else torch.cat([history, nxt[:, None]], dim=1)
            if lean is not None:  # the same arithmetic as the modules' cached step, in fewer operations;
                positions = positions[:, -1:] + 1  # its buffers hold the mask, so only the new position
                hidden = lean.step(nxt, positions[:, 0])
                continue
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            if use_cache:
                out = body(input_ids=nxt[:, None], attention_mask=mask if padded else None,
                           position_ids=positions[:, -1:], cache=cache, use_cache=True)
            else:  # the whole sequence again: prompt embeddings + every generated token
                full = torch.cat([embeds, embed_tokens(history).to(embeds.dtype)], dim=1)
                out = body(inputs_embeds=full, attention_mask=mask if padded else None, position_ids=positions,
                           use_cache=False)
            hidden = out.last_hidden_state[:, -1]
    finally:
        model.train(was_training)


def _result(tokenizer, state: dict, stop: Sequence[str]) -> Generation:
    raw = [tokenizer.decode(t) for t in state["tokens"]]
    return Generation(texts=[answer_text(r, stop) for r in raw], raw=raw, tokens=state["tokens"],
                      finish_reasons=state["reasons"], time_to_first_token=state["first"],
                      seconds=time.perf_counter() - state["t0"], prompt_tokens=state["prompt_tokens"])


def generate(model, tokenizer, prompts: Union[str, Sequence[str]], *, pixels: Optional[torch.Tensor] = None,
             queries: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None, stop: Sequence[str] = (STOP,),
             eos_id: Optional[int] = EOS_ID, use_cache: bool = True,
             callback: Optional[Callable[[str], None]] = None) -> Generation:
    """Answer a batch of prompts (left-padded) about their images.

    Images come as `pixels` (B_img, 3, S, S), Q-Former `queries` or projected `image_embeds`, one per
    prompt holding `<ImageHere>`, in order. Greedy unless `do_sample`; `seed` (or `generator`) makes
    sampling repeat exactly. `stop=()` and `eos_id=None` force exactly `max_new_tokens` tokens.
    `callback(piece)` receives the answer as it grows (one prompt only), as `stream_generate` yields it.
    """
    prompts = _as_prompts(prompts)
    if callback is not None and len(prompts) != 1:
        raise ValueError(f"callback streams one answer; got {len(prompts)} prompts")
    stop = tuple(stop)
    state: dict = {}
    streamer = _Streamer(tokenizer, stop) if callback is not None else None
    for _ in _decode(model, tokenizer, prompts, pixels=pixels, queries=queries, image_embeds=image_embeds,
                     max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                     repetition_penalty=repetition_penalty, seed=seed, generator=generator, stop=stop,
                     eos_id=eos_id, use_cache=use_cache, state=state):
        if streamer is not None:
            piece = streamer.push(state["tokens"][0])
            if piece:
                callback(piece)
    result = _result(tokenizer, state, stop)
    if streamer is not None:
        piece = streamer.finish(result.texts[0])
        if piece:
            callback(piece)
    return result


def stream_generate(model, tokenizer, prompt: str, *, callback: Optional[Callable[[str], None]] = None,
                    **kwargs) -> Iterator[str]:
    """Yield the answer to one prompt piece by piece as it is generated (same keywords as `generate`).

    The pieces join to exactly `generate(...).texts[0]`: text that may still become part of a stop
    string or of a multi-byte character is held back until it is certain.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"stream_generate answers one prompt (a str), got {type(prompt).__name__}")
    stop = tuple(kwargs.pop("stop", (STOP,)))
    state: dict = {}
    streamer = _Streamer(tokenizer, stop)
    defaults = {"pixels": None, "queries": None, "image_embeds": None, "max_new_tokens": 20, "do_sample": False,
                "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": None, "generator": None,
                "eos_id": EOS_ID, "use_cache": True}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"stream_generate got unexpected keyword(s): {', '.join(sorted(unknown))}")
    args = {**defaults, **kwargs}
    for _ in _decode(model, tokenizer, [prompt], stop=stop, state=state, **args):
        piece = streamer.push(state["tokens"][0])
        if piece:
            if callback is not None:
                callback(piece)
            yield piece
    piece = streamer.finish(_result(tokenizer, state, stop).texts[0])
    if piece:
        if callback is not None:
            callback(piece)
        yield piece


def greedy_generate(model, tokenizer, prompts: list[str], *, pixels: Optional[torch.Tensor] = None,
                    queries: Optional[torch.Tensor] = None, max_new_tokens: int = 20,
                    stop: tuple[str, ...] = (STOP,), eos_id: int = EOS_ID) -> list[str]:
    """Greedy answers (the evaluation's decoding): `generate(...).texts`."""
    return generate(model, tokenizer, prompts, pixels=pixels, queries=queries, max_new_tokens=max_new_tokens,
                    stop=stop, eos_id=eos_id).texts
