"""Regenerate the README tables that are built from results files (README.md and README.zh.md), no hand-copied
numbers: each such table sits between `<!-- table NAME ... -->` and `<!-- /table -->`, and its rows are
(label, results file, row) in TABLES below; the numbers come from the row of the committed JSON.

    python benchmarks/readme_tables.py            # rewrite the tables in both READMEs
    python benchmarks/readme_tables.py --check    # exit 1 if a README differs from what the results say

To add a row: add the results file (benchmarks/results/), then a line to the table's spec here, and run it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
READMES = {"en": ROOT / "README.md", "zh": ROOT / "README.zh.md"}

# Rows of a KLD table: (English label, Chinese label, results stem, the row's id in that file's "results").
QWEN15_2BIT = [
    ("llama.cpp IQ1_M + imatrix", "llama.cpp IQ1_M + imatrix",
     "frontier_qwen15-iq1m-q3ks", "llama.cpp:IQ1_M+imatrix"),
    ("twinquant measured allocation at IQ1_M's bytes (same measurement and control)",
     "twinquant 实测分配，IQ1_M 的字节数（同一测量与对照）",
     "frontier_qwen15-iq1m-q3ks", "target:2.408821+fisher32-nosrc"),
    ("llama.cpp IQ2_XXS + imatrix", "llama.cpp IQ2_XXS + imatrix",
     "frontier_qwen15-iq2xxs", "llama.cpp:IQ2_XXS+imatrix"),
    ("twinquant measured allocation at IQ2_XXS's bytes (same measurement and control)",
     "twinquant 实测分配，IQ2_XXS 的字节数（同一测量与对照）",
     "frontier_qwen15-iq2xxs", "target:2.618406+fisher32-nosrc"),
    ("llama.cpp IQ2_XS + imatrix", "llama.cpp IQ2_XS + imatrix", "quality_qwen15", "llama.cpp:IQ2_XS+imatrix"),
    ("twinquant GPTQ / block LDLQ into IQ2_XS's types (damp 0.5, 17920 tokens)",
     "twinquant GPTQ / 块 LDLQ，IQ2_XS 的类型（damp 0.5，17920 个 token）",
     "quality_qwen15", "twinquant:gptq@IQ2_XS"),
    ("twinquant, the same with damp 0.01 on 8192 tokens (before)", "twinquant，同上但 damp 0.01、8192 个 token（之前）",
     "quality_qwen15-damp001-8k", "twinquant:gptq@IQ2_XS"),
    ("twinquant measured allocation at IQ2_XS's bytes (Fisher cost on 32 sampled rows; Q4_K, Q6_K excluded)",
     "twinquant 实测分配，IQ2_XS 的字节数（Fisher 代价，抽 32 行；排除 Q4_K、Q6_K）",
     "frontier_qwen15", "target:2.795366+fisher32-nosrc"),
    ("llama.cpp IQ2_S + imatrix", "llama.cpp IQ2_S + imatrix", "frontier_qwen15-iq2s", "llama.cpp:IQ2_S+imatrix"),
    ("twinquant measured allocation at IQ2_S's bytes (same measurement and control)",
     "twinquant 实测分配，IQ2_S 的字节数（同一测量与对照）",
     "frontier_qwen15-iq2s", "target:2.962764+fisher32-nosrc"),
    ("llama.cpp IQ2_M + imatrix", "llama.cpp IQ2_M + imatrix", "frontier_qwen15-iq2m", "llama.cpp:IQ2_M+imatrix"),
    ("twinquant measured allocation at IQ2_M's bytes (same measurement and control)",
     "twinquant 实测分配，IQ2_M 的字节数（同一测量与对照）",
     "frontier_qwen15-iq2m", "target:3.130431+fisher32-nosrc"),
    ("llama.cpp Q2_K_S + imatrix", "llama.cpp Q2_K_S + imatrix",
     "frontier_qwen15-q2ks-iq3xxs", "llama.cpp:Q2_K_S+imatrix"),
    ("twinquant measured allocation at Q2_K_S's bytes (same measurement and control)",
     "twinquant 实测分配，Q2_K_S 的字节数（同一测量与对照）",
     "frontier_qwen15-q2ks-iq3xxs", "target:3.199661+fisher32-nosrc"),
    ("the same, its Fisher weights from windows held out of the Hessians (measured again)",
     "同上，Fisher 权重取自 Hessian 之外的留出窗口（重新测量）",
     "frontier_qwen15-heldout", "target:3.199661+fisher32-heldout"),
    ("the same with the RH rotation in front (measured and quantized in the rotated basis; the tied head untied)",
     "同上，前面加 RH 旋转（在旋转后的基下测量与量化；绑定的输出头被解绑）",
     "frontier_qwen15-rh", "target:3.199661+fisher32-rh"),
    ("AutoRound 0.16.1 `gguf:q2_k_s`, its optimized RTN (`--iters 0`; 32 x 512 tokens of groups_merged.txt)",
     "AutoRound 0.16.1 `gguf:q2_k_s`，其优化 RTN（`--iters 0`；groups_merged.txt 的 32 x 512 个 token）",
     "frontier_qwen15-autoround", "autoround:q2_k_s"),
    ("llama.cpp hand mix: IQ2_XS + imatrix, attn_q/attn_output Q4_K, attn_k/attn_v Q5_K, ffn_down IQ3_S "
     "(`--tensor-type`)",
     "llama.cpp 手工组合：IQ2_XS + imatrix，attn_q/attn_output Q4_K，attn_k/attn_v Q5_K，ffn_down IQ3_S"
     "（`--tensor-type`）",
     "frontier_qwen15-handmix",
     "llama.cpp:IQ2_XS+imatrix+attn_q=Q4_K+attn_k=Q5_K+attn_v=Q5_K+attn_output=Q4_K+ffn_down=IQ3_S"),
    ("twinquant measured allocation at the hand mix's bytes (same measurement and control)",
     "twinquant 实测分配，手工组合的字节数（同一测量与对照）",
     "frontier_qwen15-handmix", "target:3.220633+fisher32-nosrc"),
    ("llama.cpp Q2_K + imatrix", "llama.cpp Q2_K + imatrix", "quality_qwen15", "llama.cpp:Q2_K+imatrix"),
    ("twinquant measured allocation at Q2_K's bytes (same measurement and control)",
     "twinquant 在 Q2_K 字节数下的实测分配（同一测量与对照）",
     "frontier_qwen15-q2k", "target:3.362488+fisher32-nosrc"),
    ("twinquant's earlier `default` (GPTQ into Q2_K's mix, RH rotation, damp 0.5, 17920 tokens)",
     "twinquant 此前的 `default`（GPTQ 量化为 Q2_K 组合，RH 旋转，阻尼 0.5，17920 个 token）",
     "quality_qwen15-default", "twinquant:recipe=default"),
    ("twinquant `default` now: GPTQ into `twinquant:Q2_K`, no rotation (same damp and tokens)",
     "twinquant 现在的 `default`：GPTQ 量化为 `twinquant:Q2_K`，不旋转（阻尼与 token 数相同）",
     "quality_qwen15-roles", "twinquant:recipe=benchmarks/recipes/q2k-size-roles.yaml"),
    ("twinquant `default` with the RH rotation in front (R1+R2; Hessians and importance in the rotated basis)",
     "twinquant `default` 前面加 RH 旋转（R1+R2；Hessian 与重要性在旋转后的基下计算）",
     "quality_qwen15-roles-rh", "twinquant:recipe=benchmarks/recipes/q2k-roles-rh.yaml"),
    ("llama.cpp IQ3_XXS + imatrix", "llama.cpp IQ3_XXS + imatrix",
     "frontier_qwen15-q2ks-iq3xxs", "llama.cpp:IQ3_XXS+imatrix"),
    ("twinquant measured allocation at IQ3_XXS's bytes (same measurement and control)",
     "twinquant 实测分配，IQ3_XXS 的字节数（同一测量与对照）",
     "frontier_qwen15-q2ks-iq3xxs", "target:3.435368+fisher32-nosrc"),
    ("llama.cpp Q3_K_S + imatrix", "llama.cpp Q3_K_S + imatrix",
     "frontier_qwen15-iq1m-q3ks", "llama.cpp:Q3_K_S+imatrix"),
    ("twinquant measured allocation at Q3_K_S's bytes (same measurement and control)",
     "twinquant 实测分配，Q3_K_S 的字节数（同一测量与对照）",
     "frontier_qwen15-iq1m-q3ks", "target:3.850215+fisher32-nosrc"),
]

KLD_COLUMNS = {"en": "| file (all from one F16 reference) | MiB | bpw | PPL | mean KLD | 99% KLD | same top | results |",
               "zh": "| 文件（都来自同一个 F16 参考） | MiB | bpw | PPL | 平均 KLD | 99% KLD | top-1 一致 | 结果文件 |"}
TABLES = {"qwen15-2bit": QWEN15_2BIT}


def _row(stem: str, row: str) -> dict:
    path = RESULTS / f"{stem}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no such results file (a README row cites it)")
    found = [r for r in json.loads(path.read_text())["results"] if r["row"] == row]
    if len(found) != 1:
        raise SystemExit(f"{path}: {len(found)} rows named {row!r}")
    return found[0]


def kld_table(spec, lang: str) -> list[str]:
    lines = [KLD_COLUMNS[lang], "|---|---|---|---|---|---|---|---|"]
    for en, zh, stem, row in spec:
        r = _row(stem, row)
        label = en if lang == "en" else zh
        lines.append(f"| {label} | {r['file_bytes'] / 2**20:.1f} | {r['bpw']:.3f} | {r['ppl']:.3f} | "
                     f"{r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {100 * r['same_top']:.1f}% | "
                     f"`benchmarks/results/{stem}.json` |")
    return lines


def render(text: str, lang: str) -> str:
    """`text` with every generated table replaced by what its results say."""
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        if line.startswith("<!-- table ") and line.endswith("-->"):
            name = line.split()[2].rstrip(":")
            if name not in TABLES:
                raise SystemExit(f"README: unknown generated table {name!r}")
            end = next((j for j in range(i + 1, len(lines)) if lines[j] == "<!-- /table -->"), None)
            if end is None:
                raise SystemExit(f"README: table {name!r} has no <!-- /table --> line")
            out.extend(kld_table(TABLES[name], lang))
            out.append(lines[end])
            i = end
        i += 1
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report whether the READMEs are up to date")
    args = ap.parse_args()
    stale = []
    for lang, path in READMES.items():
        text = path.read_text()
        new = render(text, lang)
        if new != text:
            stale.append(path.name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"out of date with the results: {', '.join(stale)} (run python benchmarks/readme_tables.py)")
        return 1
    print(("rewrote " if stale else "up to date: ") + ", ".join(stale or [p.name for p in READMES.values()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
