"""lm-evaluation-harness adapter: ``EngMoELM`` answers the harness' three request types from a checkpoint.

lm-eval has no plugin discovery for models, so the name ``engmoe`` exists once this module is imported.
Run the harness through it::

    python -m engmoe.eval.harness --model engmoe --model_args checkpoint=runs/stage3 --tasks hellaswag,arc_easy
    engmoe eval harness -- --model engmoe --model_args checkpoint=runs/stage3,dtype=bf16 --tasks lambada_openai \
        --device cuda --batch_size 8

Everything after the module name is lm-eval's own command line (``run`` is implied); the device and batch size
come from lm-eval's ``--device``/``--batch_size`` (``cuda`` falls back to the CPU where there is none).
``model_args``: ``checkpoint`` (required), ``tokenizer``, ``dtype`` (fp32|bf16), ``max_length``,
``yarn_factor`` (YaRN at evaluation), ``overrides`` (``;``-separated ``--set`` items).

* ``loglikelihood``: context and continuation are encoded as one string and split where the context's own
  encoding ends (whitespace at the end of the context moves to the continuation first), so the
  continuation's tokens are those the model would see in running text; an empty context is the
  end-of-document token.
* ``loglikelihood_rolling``: every token once, from the end-of-document token, in windows of the model's
  length (engmoe.eval.scoring.rolling_requests).
* ``generate_until``: greedy (``do_sample`` with a temperature samples instead), stops at ``until`` strings,
  the end-of-document or end-of-turn token, or ``max_gen_toks``. With a KV cache (engmoe.eval.generate).
"""
from __future__ import annotations

import json
import sys
from typing import Any, Optional

import torch

from engmoe.eval.model import InferenceModel, load_model
from engmoe.eval.scoring import continuation_request, greedy_generate, rolling_requests, score

try:
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register
except ImportError:  # the adapter's methods work (and are tested) without the harness installed
    _LMBase = object

    def _register(*_names):
        return lambda cls: cls

DEFAULT_MAX_GEN_TOKS = 256


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@_register("engmoe")
class EngMoELM(_LMBase):
    def __init__(self, checkpoint: Optional[str] = None, tokenizer: Optional[str] = None, device: Optional[str] = None,
                 dtype: str = "fp32", batch_size: Any = 8, max_length: Optional[int] = None,
                 yarn_factor: Optional[float] = None, overrides: str = "", model: Optional[InferenceModel] = None,
                 **_ignored: Any):
        """``model``: an already loaded InferenceModel (tests, notebooks); otherwise ``checkpoint`` is loaded."""
        if _LMBase is not object:
            super().__init__()
        if model is None:
            if not checkpoint:
                raise ValueError("engmoe lm-eval adapter: model_args needs checkpoint=<run dir or iter dir>")
            sets = [o for o in str(overrides).split(";") if o]
            if yarn_factor is not None:
                sets.append(f"model.rope.yarn.factor={float(yarn_factor)}")
            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                print(f"engmoe lm-eval adapter: device {device} requested (lm-eval's default) but CUDA is not "
                      "available; using the CPU", file=sys.stderr)
                device = "cpu"
            model = load_model(checkpoint, sets, device=device, dtype=dtype, tokenizer=tokenizer)
        if model.tokenizer is None:
            raise ValueError(f"{model.checkpoint}: no tokenizer found; pass tokenizer=<path> in model_args")
        self.im = model
        self.tok = model.tokenizer
        self._max_length = int(max_length) if max_length else model.max_length
        self._batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self._eot = self.tok.eod
        self._end_of_turn = self.tok.special_ids.get("<|im_end|>")

    # -- what the harness reads ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"engmoe-{self.tok.sha256[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        from engmoe.data.chat_template import CHAT_TEMPLATE

        return CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The exported Jinja template (same text as engmoe/data/chat.py renders), thinking disabled."""
        import jinja2

        from engmoe.data.chat_template import CHAT_TEMPLATE

        env = jinja2.Environment()

        def fail(msg: str):
            raise jinja2.TemplateError(msg)

        env.globals["raise_exception"] = fail
        env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
        return env.from_string(CHAT_TEMPLATE).render(messages=chat_history, add_generation_prompt=add_generation_prompt,
                                                     enable_thinking=False)

    # -- requests ------------------------------------------------------------------------------------------
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        if not stripped:
            return [self._eot], self.tok.encode(continuation)
        whole = self.tok.encode(stripped + continuation)
        ctx = self.tok.encode(stripped)
        if whole[: len(ctx)] != ctx:  # a token spans the boundary: fall back to separate encodes
            return ctx, self.tok.encode(continuation)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        reqs = []
        for r in requests:
            context, continuation = r.args[0], r.args[1]
            ctx, cont = self._split(context, continuation)
            if not cont:
                raise ValueError(f"loglikelihood: empty continuation after context {context[-40:]!r}")
            reqs.append(continuation_request(ctx, cont, self._max_length))
        return [(res.logprob, res.greedy) for res in score(self.im, reqs, batch_size=self._batch_size)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            tokens = self.tok.encode(r.args[0])
            if not tokens:
                out.append(0.0)
                continue
            results = score(self.im, rolling_requests(tokens, self._eot, self._max_length), batch_size=self._batch_size)
            out.append(sum(x.logprob for x in results))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            prompt = self.tok.encode(context) if context else [self._eot]
            stop_ids = {self._eot} | ({self._end_of_turn} if self._end_of_turn is not None else set())
            sample = _bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 0.0) or 0.0) > 0
            if sample:
                ids = self._sample(prompt, max_new, stop_ids, float(kwargs["temperature"]), until)
            else:
                ids = greedy_generate(self.im, prompt, max_new, stop_ids,
                                      stop=(lambda g: any(u in self.tok.decode(g) for u in until)) if until else None)
            text = self.tok.decode(ids, skip_special=True)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
            if hasattr(self, "cache_hook"):
                self.cache_hook.add_partial("generate_until", (context, r.args[1]), text)
        return out

    def _sample(self, prompt: list[int], max_new: int, stop_ids: set[int], temperature: float, until: list[str]
                ) -> list[int]:
        """Sampled continuation (seeded: the same request gives the same text), with the KV cache."""
        from engmoe.eval.generate import generate

        g = torch.Generator(device="cpu").manual_seed(1234)
        return generate(self.im, prompt, max_new, stop_ids,
                        stop=(lambda out: any(u in self.tok.decode(out) for u in until)) if until else None,
                        temperature=temperature, generator=g, max_length=self._max_length)


def main(argv: Optional[list[str]] = None) -> int:
    """lm-eval's command line with the ``engmoe`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]  # lm-eval parses sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
