"""One vLLM run in a fresh process, for tests/test_vllm_plugin.py (engines do not tear down cleanly).

    python tests/vllm_child.py SPEC.json OUT.json

SPEC: {"model": path, "load_format": "auto" | "mmapload", "extra": {...} | null, "quantization": str | null,
"tp": int, "prompts": [[token ids], ...], "max_tokens": int}. OUT: {"ok": true, "results": [{"tokens",
"logprobs", "prompt_logprobs"}, ...]} (logprobs as {token id: logprob}) or {"ok": false, "error": "Type:
message", "chain": [every exception in the cause / context chain]}. Greedy, top-5 logprobs, eager, one seed.
The environment (VLLM_ENABLE_V1_MULTIPROCESSING, VLLM_CPU_KVCACHE_SPACE, ...) is the caller's.
"""

import json
import sys


def _lp(d):
    return None if d is None else {str(k): v.logprob for k, v in d.items()}


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    kw = dict(model=spec["model"], load_format=spec.get("load_format", "auto"), skip_tokenizer_init=True,
              dtype="bfloat16", max_model_len=128, max_num_seqs=4, enforce_eager=True, seed=0,
              tensor_parallel_size=spec.get("tp", 1))
    if spec.get("extra") is not None:
        kw["model_loader_extra_config"] = spec["extra"]
    if spec.get("quantization"):
        kw["quantization"] = spec["quantization"]
    llm = LLM(**kw)
    sp = SamplingParams(max_tokens=spec.get("max_tokens", 4), temperature=0.0, logprobs=5, prompt_logprobs=5,
                        detokenize=False)
    out = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], sp)
    return {"ok": True, "results": [{"tokens": list(r.outputs[0].token_ids),
                                     "logprobs": [_lp(x) for x in r.outputs[0].logprobs],
                                     "prompt_logprobs": [_lp(x) for x in r.prompt_logprobs]} for r in out]}


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    try:
        res = run(spec)
    except BaseException as e:   # noqa: BLE001 - the test reads what vLLM raised
        chain, x = [], e
        while x is not None and len(chain) < 10:
            chain.append(f"{type(x).__name__}: {x}")
            x = x.__cause__ or x.__context__
        res = {"ok": False, "error": chain[0], "chain": chain}
    json.dump(res, open(sys.argv[2], "w"))


if __name__ == "__main__":   # TP > 1 spawns workers that import this file
    main()
