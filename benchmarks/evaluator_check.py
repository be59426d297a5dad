"""twinquant's own evaluator beside stock llama-perplexity on the same files: the cross-check for files stock llama.cpp
judges slowly or strangely (Q2_0 has only a scalar kernel on x86; a broken-looking result must be the file's, not the
kernel's).

For each file in a model's quality cache (`~/.cache/twinquant/quality/MODEL`, made by benchmarks/quality.py):
`twinquant perplexity FILE -f wiki.test.raw --ref ref-f16.gguf -c 512 --chunks N` and the stock figures quality.py
recorded for the same file and chunks (`FILE.eval-N.json`), side by side.

    python benchmarks/evaluator_check.py --model smollm2-135m --files llama.cpp-Q2_0-imatrix twinquant-gptq-Q2_0 \
        --chunks 10 --tag smol-q2_0

Writes benchmarks/results/evaluator_check_TAG.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import twinquant  # noqa: E402,F401  (registers llama.cpp's types gguf-py lacks: Q2_0 files are read below)
from provenance import record  # noqa: E402
from quality import sha256, tensor_stats  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
KEYS = ("ppl", "kld_mean", "same_top")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--files", nargs="+", required=True, help="file stems in the model's quality cache")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    work = Path.home() / ".cache" / "twinquant" / "quality" / a.model
    ref = work / "ref-f16.gguf"
    rows = []
    for stem in a.files:
        path = work / f"{stem}.gguf"
        out = work / f"{stem}.twinquant-eval-{a.chunks}.json"
        if not out.exists() or out.stat().st_mtime < path.stat().st_mtime:     # evaluated once per file
            subprocess.run([sys.executable, "-m", "twinquant", "perplexity", str(path), "-f", str(WIKI), "--ref",
                            str(ref), "-c", "512", "--chunks", str(a.chunks), "-q", "--json", str(out)], check=True,
                           cwd=ROOT)
        ours = json.loads(out.read_text())
        stock_file = work / f"{stem}.eval-{a.chunks}.json"
        stock = json.loads(stock_file.read_text()) if stock_file.exists() else {}
        tbytes, n = tensor_stats(path)
        rows.append({"file": path.name, "sha256": sha256(path), "tensor_bytes": tbytes, "mib": tbytes / 2**20,
                     "bpw": 8 * tbytes / n,
                     "twinquant": {k: ours.get(k) for k in KEYS},
                     "stock_llama_perplexity": {k: stock.get(k) for k in KEYS} if stock else None})
    res = {**record(model=a.model, chunks=a.chunks, ctx=512, text=WIKI.name,
                    reference={"file": ref.name, "sha256": sha256(ref)}), "rows": rows}
    dest = Path(a.out)
    (dest / f"evaluator_check_{a.tag}.json").write_text(json.dumps(res, indent=1))
    lines = [f"# twinquant's evaluator beside stock llama-perplexity ({a.model}, wiki.test.raw, ctx 512, {a.chunks} "
             "chunks)", "", "| file | MiB | bpw | twinquant PPL | stock PPL | twinquant mean KLD | stock mean KLD | twinquant same top | "
             "stock same top |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, s = r["twinquant"], r["stock_llama_perplexity"] or {}

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        lines.append(f"| {r['file']} | {r['mib']:.1f} | {r['bpw']:.3f} | {f(t['ppl'], '.3f')} | {f(s.get('ppl'), '.3f')} | {f(t['kld_mean'], '.4f')} | "
                     f"{f(s.get('kld_mean'), '.4f')} | {f(t['same_top'], '.3f')} | {f(s.get('same_top'), '.3f')} |")
    (dest / f"evaluator_check_{a.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
