"""Stock llama.cpp (llama-cpp-python) as the oracle: SmolLM2 from its package, per-token log-probs on 4 windows
of 512 tokens under the llama.cpp protocol; perplexities must agree within 1%."""

import math

import numpy as np
import pytest
import torch

from tests.paths import WIKI
from twinquant import zoo
from twinquant.eval.perplexity import evaluate, make_windows
from twinquant.io.load import load_model

pytestmark = pytest.mark.slow
CTX, CHUNKS = 512, 4


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", materialize=True)


@pytest.fixture(scope="module")
def llama():
    import llama_cpp

    return llama_cpp.Llama(model_path=str(zoo.resolve("smollm2-135m")), n_ctx=CTX, logits_all=True,
                           verbose=False, n_threads=2, seed=0)


def test_perplexity_matches_llama_cpp(smollm2, llama):
    text = WIKI.read_text(encoding="utf-8")[:20000]
    theirs = llama.tokenize(text.encode(), add_bos=True, special=False)
    ours = smollm2.tokenizer.encode(text)
    assert ours == theirs                                   # same tokens, same BOS rule
    windows = make_windows(ours, CTX, CHUNKS, "llama.cpp", smollm2.tokenizer.bos_id, smollm2.tokenizer.add_bos)

    nll_theirs, lp_theirs = [], []
    for i in range(CHUNKS):
        llama.reset()
        llama.eval(windows.tokens[i].tolist())
        logits = torch.from_numpy(np.array(llama.scores[windows.first: CTX - 1], dtype=np.float32))
        lp = torch.log_softmax(logits, -1).gather(1, windows.targets(i)[:, None])[:, 0]
        lp_theirs.append(lp)
        nll_theirs.append(-lp.double())
    ppl_theirs = math.exp(torch.cat(nll_theirs).mean().item())

    res = evaluate(smollm2, windows, progress=False)
    assert res["tokens_scored"] == CHUNKS * (CTX // 2 - 1)
    assert abs(res["ppl"] / ppl_theirs - 1) < 0.01, (res["ppl"], ppl_theirs)

    # per-token agreement, not just the mean: llama.cpp runs Q4_1 x Q8_1 dot products, we run exact dequantized
    # weights, so tokens differ a little but must correlate tightly
    from twinquant.eval.perplexity import window_logprobs

    ours_lp = torch.cat([window_logprobs(smollm2, windows, i).gather(1, windows.targets(i)[:, None])[:, 0]
                         for i in range(CHUNKS)])
    theirs_lp = torch.cat(lp_theirs)
    corr = torch.corrcoef(torch.stack([ours_lp, theirs_lp]))[0, 1].item()
    assert corr > 0.99, corr
