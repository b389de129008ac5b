"""HMT as an lm-evaluation-harness model: ``--model hmt``.

Importing this module registers :class:`HMTLM` under the name ``hmt`` in lm-eval's model
registry (``import hmt`` alone never imports lm-eval). lm-eval (0.4.x) does not discover
models from other packages, so run it through this module, which registers the model and
then hands the command line to lm-eval's own CLI unchanged::

    python -m hmt.lm_eval_model run --model hmt \\
        --model_args backbone=PATH,checkpoint=runs/x/final,batch_size=4 \\
        --tasks wikitext --device cuda

or from Python: ``lm_eval.simple_evaluate(model=HMTLM(...), tasks=[...])`` (or
``model="hmt"`` once this module is imported).

Every request is read from a fresh, empty memory (its own stream), so requests never see
each other. Scoring is HMT's own forward: the text is read segment by segment, as in
training and in :mod:`hmt.evaluate`; a document of any length is scored in one pass (no
rolling windows: every token is predicted exactly once, with everything before it in
memory). As in that forward, the memory token of a segment is recalled with a query built
from the segment's first j tokens, so a token among them is scored with a recall that has
seen up to j tokens of its own segment; ``generate_until`` decodes causally (see
:mod:`hmt.generation`).
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (lazy built-in models first: "hf" etc. stay resolvable)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from .backbone import load_backbone
from .config import HMTConfig
from .memory import MemoryState
from .model import HMT

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}
_CONFIG_ARGS = ("segment_length", "sensory_memory_size", "num_memory_embeddings", "representation_length",
                "use_retrieval")
_IGNORED_ARGS = ("max_batch_size", "trust_remote_code")


class _StopGeneration(Exception):
    """Raised by :class:`_StopStrings` to end ``HMT.generate`` at a stop string."""


class _StopStrings:
    """A ``transformers``-style streamer that collects new tokens and stops at a stop string.

    ``HMT.generate`` calls ``put`` first with the prompt (skipped, as ``TextStreamer`` with
    ``skip_prompt=True`` does) and then with each new token.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.tokens: list[int] = []
        self._prompt_seen = False
        # the last few tokens are enough to see a stop string that has just been completed
        lengths = [len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stops]
        self.lookback = max(lengths, default=1) + 8

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        if self.stops:
            tail = self.tokenizer.decode(self.tokens[-self.lookback :], skip_special_tokens=False)
            if any(stop in tail for stop in self.stops):
                raise _StopGeneration

    def end(self) -> None:
        pass


@register_model("hmt")
class HMTLM(TemplateLM):
    """lm-eval model around :class:`hmt.HMT`.

    model_args (``--model_args key=value,...``):
        backbone (or ``pretrained``): HF model id or local directory (default: SmolLM2-135M,
            offline).
        checkpoint: directory written by ``HMT.save_pretrained`` (trained HMT); without it
            HMT is untrained (freshly initialised memory parameters).
        segment_length, sensory_memory_size, num_memory_embeddings, representation_length,
            use_retrieval: :class:`hmt.HMTConfig` fields (override the checkpoint's when given).
        device: ``cuda``, ``cuda:1``, ``cpu``... (default: cuda when available).
        dtype: ``float32`` (default), ``bfloat16``, ``float16``.
        batch_size: requests per forward for loglikelihood / loglikelihood_rolling (each row
            is its own stream; ``auto`` means 1). Generation runs one request at a time.
        max_gen_toks: default generation budget when a task gives none (256).
        add_bos_token: force (True) or suppress (False) the tokenizer's special tokens.
        prefix_token_id: the token that conditions a text with no context (default BOS,
            else EOS, as lm-eval's ``hf`` model).
        exact_retrieval: passed to ``HMT.generate`` (default True).

    From Python, ``model=`` (an :class:`hmt.HMT`) and ``tokenizer=`` wrap an HMT already in
    memory instead of loading one.
    """

    def __init__(
        self,
        backbone: Optional[str] = None,
        checkpoint: Optional[str] = None,
        segment_length: Optional[int] = None,
        sensory_memory_size: Optional[int] = None,
        num_memory_embeddings: Optional[int] = None,
        representation_length: Optional[int] = None,
        use_retrieval: Optional[bool] = None,
        device: Optional[str] = None,
        dtype: str = "float32",
        batch_size: Any = 1,
        max_gen_toks: int = 256,
        add_bos_token: Optional[bool] = None,
        prefix_token_id: Optional[int] = None,
        exact_retrieval: bool = True,
        model: Optional[HMT] = None,
        tokenizer=None,
        **kwargs,
    ):
        super().__init__()
        pretrained = kwargs.pop("pretrained", None)  # the `hf` model's name for it
        if pretrained is not None:
            if backbone is not None and backbone != pretrained:
                raise ValueError(f"backbone={backbone!r} and pretrained={pretrained!r} disagree; give one.")
            backbone = pretrained
        unknown = sorted(k for k in kwargs if k not in _IGNORED_ARGS)
        if unknown:
            raise TypeError(
                f"Unknown model_args for --model hmt: {unknown}. Known: backbone, checkpoint, "
                f"{', '.join(_CONFIG_ARGS)}, device, dtype, batch_size, max_gen_toks, add_bos_token, "
                "prefix_token_id, exact_retrieval."
            )
        overrides = {name: value for name, value in zip(
            _CONFIG_ARGS, (segment_length, sensory_memory_size, num_memory_embeddings, representation_length,
                           use_retrieval)) if value is not None}
        if model is not None:
            if tokenizer is None:
                raise ValueError("HMTLM(model=...) needs the backbone's tokenizer= too.")
            if backbone is not None or checkpoint is not None or overrides:
                raise ValueError("Give either model= (an HMT in memory) or backbone=/checkpoint=/config fields.")
            self._device = torch.device(device) if device is not None else model.embedding_layer.weight.device
            self.model = model.to(self._device)
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            torch_dtype = _DTYPES.get(str(dtype).lower()) if not isinstance(dtype, torch.dtype) else dtype
            if torch_dtype is None:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
            net, tokenizer = load_backbone(backbone, dtype=torch_dtype, device=self._device)
            if checkpoint is not None:
                self.model = HMT.from_pretrained(net, checkpoint, **overrides)
            else:
                self.model = HMT(net, HMTConfig(**overrides))
            self.model.to(self._device)
        self.model.eval()
        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.exact_retrieval = bool(exact_retrieval)
        self._max_gen_toks = int(max_gen_toks)
        self._batch_size = self._parse_batch_size(batch_size)
        self._prefix_states: "OrderedDict[tuple, MemoryState]" = OrderedDict()

    @staticmethod
    def _parse_batch_size(batch_size) -> int:
        if batch_size is None:
            return 1
        text = str(batch_size)
        if text.startswith("auto"):
            logger.warning("--model hmt has no automatic batch size; using batch_size=1.")
            return 1
        value = int(text)
        if value < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
        return value

    # ------------------------------------------------------------------ properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    @property
    def segment_length(self) -> int:
        return self.model.config.segment_length

    # ------------------------------------------------------------------ tokens
    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """As lm-eval's ``hf`` model: the tokenizer's default special tokens unless told
        otherwise, none when the string already starts with the prefix (BOS) token."""
        special = {}
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        if add_special_tokens is None:
            prefix = self.tokenizer.decode(self.prefix_token_id)
            if prefix and string.startswith(prefix):
                special = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    def _new_memory(self, batch_size: int) -> MemoryState:
        return self.model.new_memory(batch_size)

    def _batch(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask; each row is its own stream."""
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _read_prefixes(self, prefixes: list[tuple]) -> list[MemoryState]:
        """The memory after reading each prefix (whole segments) from an empty memory.

        Prefixes shared by several requests (the context of a multiple-choice question) are
        read once: the last states are kept in a small cache keyed by their tokens.
        """
        states: list[Optional[MemoryState]] = [None] * len(prefixes)
        todo: dict[tuple, list[int]] = {}
        for i, prefix in enumerate(prefixes):
            if prefix in self._prefix_states:
                self._prefix_states.move_to_end(prefix)
                states[i] = self._prefix_states[prefix]
            else:
                todo.setdefault(prefix, []).append(i)
        if todo:
            keys = list(todo)
            ids, mask = self._batch([list(k) for k in keys])
            out = self.model(ids, attention_mask=mask, memory_state=self._new_memory(len(keys)), return_logits=False)
            for row, key in enumerate(keys):
                state = out.memory_state.select([row])
                self._prefix_states[key] = state
                for i in todo[key]:
                    states[i] = state
            while len(self._prefix_states) > 64:
                self._prefix_states.popitem(last=False)
        return states  # type: ignore[return-value]

    @torch.no_grad()
    def _score_continuations(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation after its context, and is_greedy.

        Each row ``(context, continuation)`` is read from an empty memory as one stream;
        the whole segments before the first scored position are read once (without logits)
        and the rest with logits, which equals one forward over the whole row.
        """
        L = self.segment_length
        prefixes, tails, counts = [], [], []
        for context, continuation in rows:
            tokens = list(context) + list(continuation)
            inp = tokens[:-1]  # the last token is only ever a target
            n = len(continuation)
            skip = (len(inp) - n) // L * L  # whole segments before the first scored position
            prefixes.append(tuple(inp[:skip]))
            tails.append(inp[skip:])
            counts.append(n)
        states = [self._new_memory(1) if not p else None for p in prefixes]
        need = [i for i, p in enumerate(prefixes) if p]
        if need:
            for i, state in zip(need, self._read_prefixes([prefixes[i] for i in need])):
                states[i] = state
        ids, mask = self._batch(tails)
        logits = self.model(ids, attention_mask=mask, memory_state=MemoryState.cat(states), return_logits=True).logits
        results = []
        for row, ((_, continuation), tail, n) in enumerate(zip(rows, tails, counts)):
            scored = logits[row, len(tail) - n : len(tail)].float()  # (n, V): predict the continuation
            target = torch.as_tensor(continuation, dtype=torch.long, device=scored.device)
            logprobs = F.log_softmax(scored, dim=-1)
            total = float(logprobs.gather(1, target[:, None]).sum())
            greedy = bool((scored.argmax(-1) == target).all())
            results.append((total, greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ``((context, continuation), context_enc, continuation_enc)`` as TemplateLM builds them."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        todo = []
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            if len(continuation_enc) == 0:
                results[i] = (0.0, True)
            else:
                todo.append(i)
        # same contexts together (their prefix memory is read once), longest first
        todo.sort(key=lambda i: (-len(requests[i][1]), tuple(requests[i][1]), -len(requests[i][2])))
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="hmt loglikelihood")
        bar.update(len(requests) - len(todo))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            scores = self._score_continuations([(requests[i][1], requests[i][2]) for i in chunk])
            for i, score in zip(chunk, scores):
                results[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
            bar.update(len(chunk))
        bar.close()
        self._prefix_states.clear()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document: every token scored once, the first one
        conditioned on ``prefix_token_id`` only, the rest on everything before them (HMT
        reads any length, so there are no windows)."""
        docs = [self.tok_encode(req.args[0]) for req in requests]
        results: list[float] = [0.0] * len(requests)
        order = sorted((i for i, d in enumerate(docs) if d), key=lambda i: -len(docs[i]))
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="hmt loglikelihood_rolling")
        bar.update(len(requests) - len(order))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            ids, mask = self._batch([[self.prefix_token_id] + docs[i] for i in chunk])
            out = self.model(ids, attention_mask=mask, labels=ids, memory_state=self._new_memory(len(chunk)),
                             return_logits=False)
            for row, i in enumerate(chunk):
                results[i] = -float(out.nll_sum[row])
            bar.update(len(chunk))
        bar.close()
        for req, value in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), value)
        return results

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode until a stop string (``until``, plus EOS) or ``max_gen_toks`` new tokens.

        Greedy unless the task asks for ``do_sample=True``; each request from an empty memory.
        """
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False) if self.eot_token_id is not None else None
        results = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="hmt generate_until"):
            context, gen_kwargs = req.args
            kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            options = {"do_sample": bool(kwargs.pop("do_sample", False))}
            for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
                if name in kwargs:
                    options[name] = kwargs.pop(name)
            if not options["do_sample"]:
                options = {"do_sample": False}
            if kwargs:
                logger.warning("--model hmt ignores generation arguments %s", sorted(kwargs))
            prompt = self.tok_encode(context) if context else []
            if not prompt:
                prompt = [self.prefix_token_id]
            text = self._generate(prompt, until, max_gen_toks, options)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results

    def _generate(self, prompt: list[int], until: list[str], max_new_tokens: int, options: dict) -> str:
        if max_new_tokens <= 0:
            return ""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        streamer = _StopStrings(self.tokenizer, until)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        try:
            self.model.generate(ids, memory_state=self._new_memory(1), max_new_tokens=max_new_tokens,
                                eos_token_id=self.eot_token_id, pad_token_id=pad, streamer=streamer,
                                exact_retrieval=self.exact_retrieval, **options)
        except _StopGeneration:
            pass
        finally:
            self.model.eval()
        text = self.tok_decode(streamer.tokens, skip_special_tokens=True)
        return postprocess_generated_text(text, until, None)

    def get_model_info(self) -> dict:
        config = self.model.config
        return {"hmt_config": config.to_dict(), "model_dtype": str(self.model.embedding_layer.weight.dtype)}


def main(argv: Optional[list[str]] = None) -> None:
    """lm-eval's command line with ``--model hmt`` available: ``python -m hmt.lm_eval_model ...``."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # `python -m hmt.lm_eval_model` runs this file as __main__; make a later
    # `import hmt.lm_eval_model` find this module instead of registering "hmt" twice.
    sys.modules.setdefault("hmt.lm_eval_model", sys.modules[__name__])
    main()
