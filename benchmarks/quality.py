"""Quality at ~2 bits: twinquant's recipes beside llama.cpp's own quants (and AutoRound), judged by stock llama.cpp.

For each model the reference is the packaged model dequantized to F16 (`twinquant convert --outtype f16`). Every
GGUF -- llama.cpp's, AutoRound's, twinquant's -- is made from that one reference file and evaluated by stock
`llama-perplexity` (built from the llama-cpp-python sdist by benchmarks/build_llamacpp.sh) on wiki.test.raw, ctx 512,
the first 40 chunks, with KL divergence against the reference's saved logits (`--kl-divergence-base`).

Rows
  llama.cpp    Q2_K, Q2_K + imatrix, IQ2_XS / IQ2_S / IQ2_M + imatrix, Q3_K_S + imatrix (any TYPE[+imatrix]);
               the imatrix comes from stock `llama-imatrix` on ../shared/data/calibration/groups_merged.txt
  twinquant    METHOD[+rh|+ro][+pad][@MIX]: `twinquant quantize` with --method METHOD, --rotation, --pad and
               --mix llama.cpp:MIX (default Q2_K), calibrated on the same groups_merged.txt;
               or recipe=NAME|FILE.yaml: `twinquant quantize --recipe` (built-in name or YAML file)
  autoround    autoround:FORMAT (e.g. autoround:q2_k_s), when benchmarks/setup_autoround.sh has made its venv

    python benchmarks/quality.py [--models smollm2-135m qwen2.5-coder-0.5b] [--chunks 40]
        [--llamacpp Q2_K Q2_K+imatrix IQ2_XXS+imatrix+attn_v=q4_k+output=q6_k ...] [--twinquant rtn gptq gptq+rh ...] [--autoround q2_k_s] [--force]

Every file and every evaluation is cached under --work (default ~/.cache/twinquant/quality/MODEL), so an
interrupted run resumes and a new row costs only itself. Writes benchmarks/results/quality[_TAG].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import record  # noqa: E402

SHARED = ROOT.parent / "shared"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = SHARED / "data" / "calibration" / "groups_merged.txt"
TWINQUANT = [sys.executable, "-m", "twinquant"]
# "text of another kind" for evaluation: code the models cannot have seen in training, fixed by a commit of this
# repository (its own Python source then), so any clone rebuilds the same bytes
CODE_COMMIT = "9058ec8"

LLAMACPP_ROWS = ["Q2_K", "Q2_K+imatrix", "IQ2_XS+imatrix", "IQ2_S+imatrix", "IQ2_M+imatrix", "Q3_K_S+imatrix"]
TWINQUANT_ROWS = ["rtn", "gptq", "rtn+rh", "gptq+rh", "rtn+ro", "gptq+ro",
                  "rtn+pad", "gptq+pad", "gptq+rh+pad", "gptq+ro+pad"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list, logfile: Path) -> str:
    """Run a command, its output teed into logfile; raise with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        p = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    text = logfile.read_text(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{text[-3000:]}")
    shown = cmd[len(TIME):] if cmd[:len(TIME)] == TIME and TIME else cmd
    log(f"  {Path(str(shown[0])).name} {' '.join(map(str, shown[1:3]))} ... {time.perf_counter() - t0:.0f}s")
    return text


TIME = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []


def time_facts(logfile: Path) -> dict:
    """Peak resident memory and CPU seconds of a command run under `/usr/bin/time -v` (the last one in its log)."""
    text = logfile.read_text(errors="replace") if logfile.exists() else ""
    rss = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)[-2:]]
    return {"peak_rss_mib": int(rss[-1]) / 1024 if rss else None, "cpu_seconds": sum(cpu) if cpu else None}


def code_text(work: Path) -> Path:
    """This repository's Python source at CODE_COMMIT, file after file (built once; `git show`, so any clone with
    the history makes the same bytes)."""
    path = work / f"code-{CODE_COMMIT}.txt"
    if not path.exists():
        git = ["git", "-C", str(ROOT)]
        names = subprocess.run(git + ["ls-tree", "-r", "--name-only", CODE_COMMIT, "twinquant"], check=True,
                               capture_output=True, text=True).stdout.split()
        parts = [f"# file: {n}\n" + subprocess.run(git + ["show", f"{CODE_COMMIT}:{n}"], check=True,
                                                    capture_output=True, text=True).stdout
                 for n in sorted(names) if n.endswith(".py")]
        work.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(parts), encoding="utf-8")
    return path


def eval_text(name: str) -> Path:
    """wiki (wiki.test.raw), code (code_text) or a file's path."""
    if name == "wiki":
        return WIKI
    if name == "code":
        return code_text(Path.home() / ".cache" / "twinquant" / "texts")
    if not Path(name).is_file():
        raise SystemExit(f"--text: {name} is not wiki, code or a file")
    return Path(name)


def llamacpp_bin() -> Path:
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "build_llamacpp.sh")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def _num(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else None


def parse_perplexity(text: str) -> dict:
    """The statistics llama-perplexity prints in --kl-divergence mode."""
    r = {"ppl": _num(r"^Mean PPL\(Q\)\s*:\s*([\d.]+)", text),
         "ppl_err": _num(r"^Mean PPL\(Q\)\s*:\s*[\d.]+\s*±\s*([\d.]+)", text),
         "ref_ppl": _num(r"^Mean PPL\(base\)\s*:\s*([\d.]+)", text),
         "kld_mean": _num(r"^Mean\s+KLD:\s*([\d.eE+-]+)", text),
         "kld_mean_err": _num(r"^Mean\s+KLD:\s*[\d.eE+-]+\s*±\s*([\d.eE+-]+)", text),
         "kld_p99": _num(r"^99\.0%\s+KLD:\s*([\d.eE+-]+)", text),
         "same_top": _num(r"^Same top p:\s*([\d.]+)", text)}
    if r["kld_mean"] is None or r["ppl"] is None:
        raise RuntimeError("could not parse llama-perplexity's output:\n" + text[-2000:])
    r["same_top"] = r["same_top"] / 100 if r["same_top"] is not None else None
    return r


def sha256(path: Path) -> str:
    """sha256 of a file, cached beside it (keyed by size and mtime): judged files are hashed once."""
    import hashlib

    st = path.stat()
    cache = path.with_name(path.name + ".sha256")
    key = f"{st.st_size} {st.st_mtime_ns}"
    if cache.exists():
        k, _, h = cache.read_text().partition("\n")
        if k == key:
            return h.strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    cache.write_text(f"{key}\n{h.hexdigest()}\n")
    return h.hexdigest()


def llamacpp_version(bin_dir: Path) -> str:
    out = subprocess.run([str(bin_dir / "llama-perplexity"), "--version"], capture_output=True, text=True)
    return next((ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")), "unknown")


def tensor_stats(path: Path) -> tuple[int, int]:
    """(tensor data bytes, number of weights) of a GGUF, as llama.cpp counts them for its BPW."""
    import gguf

    rd = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in rd.tensors), sum(int(t.n_elements) for t in rd.tensors)


class Bench:
    def __init__(self, model: str, work: Path, bin_dir: Path, chunks: int, threads: int, force: bool,
                 text: Path = WIKI):
        self.model, self.work, self.bin, self.chunks, self.threads, self.force = \
            model, work, bin_dir, chunks, threads, force
        work.mkdir(parents=True, exist_ok=True)
        self.text = text
        self.key = "" if text == WIKI else f"-{text.stem}"     # evaluations on other texts kept apart
        self.ref = work / "ref-f16.gguf"
        self.base = work / f"ref-c512-{chunks}{self.key}.kld"
        self.imatrix = work / "imatrix.gguf"
        self.n_params = None
        self.imatrix_chunks = None
        self.autoround_args: list[str] = []

    def inputs(self) -> dict:
        """sha256 of what every row of this model depends on: the packaged source, the F16 reference, the texts."""
        from twinquant import zoo

        out = {"reference_f16": sha256(self.ref), self.text.name: sha256(self.text), "groups_merged.txt": sha256(CALIB)}
        try:
            src = Path(zoo.resolve(self.model))
            out["source"] = {"file": src.name, "sha256": sha256(src)}
        except Exception as e:          # a path given as the model: the reference identifies it
            out["source"] = {"file": str(self.model), "error": str(e)[:200]}
        if self.imatrix.exists():
            out["imatrix.gguf"] = sha256(self.imatrix)
        return out

    def tool(self, name: str) -> str:
        return str(self.bin / name)

    def prepare(self) -> None:
        if not self.ref.exists():
            log(f"{self.model}: reference F16")
            run(TWINQUANT + ["convert", self.model, "-o", self.ref, "--outtype", "f16", "-q"],
                self.work / "ref.log")
        self.n_params = tensor_stats(self.ref)[1]
        if not self.base.exists():
            log(f"{self.model}: reference logits ({self.chunks} chunks of {self.text.name})")
            tmp = self.base.with_suffix(".tmp")
            run([self.tool("llama-perplexity"), "-m", self.ref, "-f", self.text, "-c", 512, "--chunks", self.chunks,
                 "-t", self.threads, "--kl-divergence-base", tmp], self.work / f"ref-perplexity{self.key}.log")
            os.replace(tmp, self.base)

    def need_imatrix(self) -> None:
        if not self.imatrix.exists():
            log(f"{self.model}: llama-imatrix on {CALIB.name}")
            tmp = self.work / "imatrix.tmp.gguf"
            extra = ["--chunks", self.imatrix_chunks] if self.imatrix_chunks else []
            run([self.tool("llama-imatrix"), "-m", self.ref, "-f", CALIB, "-c", 512, "-t", self.threads,
                 "-o", tmp, *extra], self.work / "imatrix.log")
            os.replace(tmp, self.imatrix)

    def make(self, row: str) -> tuple[Path, dict]:
        """Build the GGUF of a row (cached); returns (path, facts about how it was made)."""
        kind, _, spec = row.partition(":")
        out = self.work / f"{kind}-{re.sub(r'[^A-Za-z0-9_.]+', '-', spec.replace('.yaml', ''))}.gguf"
        facts: dict = {}
        if out.exists() and not self.force:
            meta = out.with_suffix(".make.json")
            return out, json.loads(meta.read_text()) if meta.exists() else facts
        tmp = out.with_name(out.stem + ".tmp.gguf")
        t0 = time.perf_counter()
        if kind == "llama.cpp":
            # FTYPE[+imatrix][+PATTERN=TYPE ...]: a hand mix, llama-quantize's --tensor-type PATTERN=TYPE, with
            # token_embd= and output= as its --token-embedding-type / --output-tensor-type
            ftype, *extra = spec.split("+")
            if any(e != "imatrix" and "=" not in e for e in extra):
                raise SystemExit(f"{row}: llama.cpp options are +imatrix and +PATTERN=TYPE")
            cmd = [self.tool("llama-quantize")]
            if "imatrix" in extra:
                self.need_imatrix()
                cmd += ["--imatrix", self.imatrix]
            whole = {"token_embd": "--token-embedding-type", "output": "--output-tensor-type"}
            for pattern, _, qtype in (e.partition("=") for e in extra if "=" in e):
                cmd += [whole[pattern], qtype] if pattern in whole else ["--tensor-type", f"{pattern}={qtype}"]
            run(TIME + cmd + [self.ref, tmp, ftype, self.threads], out.with_suffix(".log"))
        elif kind == "twinquant" and spec.startswith("recipe="):     # a built-in recipe name or a YAML file
            run(TIME + TWINQUANT + ["quantize", self.ref, "-o", tmp, "--recipe", spec[len("recipe="):], "--calib", CALIB,
                             "--report", out.with_suffix(".report.json")], out.with_suffix(".log"))
        elif kind == "twinquant":
            spec_, _, mix = spec.partition("@")
            method, *steps = spec_.split("+")
            rotation = next((s for s in steps if s in ("rh", "ro")), "none")
            cmd = TIME + TWINQUANT + ["quantize", self.ref, "-o", tmp, "--method", method, "--rotation", rotation,
                               "--mix", f"llama.cpp:{mix or 'Q2_K'}", "--calib", CALIB,
                               "--report", out.with_suffix(".report.json")]
            if "pad" in steps:
                cmd.append("--pad")
            run(cmd, out.with_suffix(".log"))
        elif kind == "autoround":
            hf = self.work / "hf"
            if not (hf / "config.json").exists():
                run(TWINQUANT + ["convert", self.ref, "-o", hf, "-q"], self.work / "hf.log")
            py = subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_autoround.sh")], check=True,
                                stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
            # the HF copy has no tokenizer files: AutoRound rebuilds them from the reference GGUF
            run([py, ROOT / "benchmarks" / "autoround_gguf.py", hf, tmp, "--format", f"gguf:{spec}",
                 "--calib", CALIB, "--tokenizer-gguf", self.ref, *self.autoround_args], out.with_suffix(".log"))
        else:
            raise SystemExit(f"unknown row kind {kind!r} in {row!r}")
        facts["make_seconds"] = time.perf_counter() - t0
        facts.update(time_facts(out.with_suffix(".log")))
        report = out.with_suffix(".report.json")
        if kind == "twinquant" and report.exists():      # how the row was made, from twinquant's own report
            rep = json.loads(report.read_text())
            facts.update({k: rep.get(k) for k in ("recipe", "calibration", "rotation")})
        os.replace(tmp, out)
        out.with_suffix(".make.json").write_text(json.dumps(facts))
        return out, facts

    def evaluate(self, row: str) -> dict:
        path, facts = self.make(row)
        cache = path.with_suffix(f".eval-{self.chunks}{self.key}.json")
        if cache.exists() and not self.force and cache.stat().st_mtime >= path.stat().st_mtime:
            r = json.loads(cache.read_text())
            r.setdefault("sha256", sha256(path))
            return r
        log(f"{self.model}: evaluate {row}")
        text = run([self.tool("llama-perplexity"), "-m", path, "-c", 512, "--chunks", self.chunks, "-t", self.threads,
                    "--kl-divergence-base", self.base, "--kl-divergence"], path.with_suffix(f".eval{self.key}.log"))
        tbytes, _ = tensor_stats(path)
        r = {"model": self.model, "row": row, "text": self.text.name, "file_bytes": path.stat().st_size, "tensor_bytes": tbytes,
             "bpw": 8 * tbytes / self.n_params, "sha256": sha256(path), **facts, **parse_perplexity(text)}
        cache.write_text(json.dumps(r))
        return r


def same_types_anchor(r: dict, results: list[dict]) -> dict | None:
    """For a twinquant row quantized into a llama.cpp mix (METHOD@MIX, no padding): llama.cpp's MIX + imatrix file,
    which has the same types tensor for tensor (GPTQ takes llama-quantize's +imatrix plan): only rounding differs."""
    kind, _, spec = r["row"].partition(":")
    if kind != "twinquant" or spec.startswith("recipe=") or "pad" in spec.split("@")[0].split("+"):
        return None
    mix = spec.partition("@")[2] or "Q2_K"
    return next((x for x in results if x["model"] == r["model"] and x["row"] == f"llama.cpp:{mix}+imatrix"), None)


def markdown(results: list[dict], chunks: int, text: str = WIKI.name) -> str:
    lines = [f"{text}, ctx 512, {chunks} chunks, stock llama-perplexity; KLD vs the F16 reference", "",
             "| model | file | MiB | bpw | PPL | mean KLD | 99% KLD | same top | KLD ÷ Q2_K+imatrix | "
             "KLD ÷ llama.cpp, same types |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        anchor = next((x for x in results if x["model"] == r["model"] and x["row"] == "llama.cpp:Q2_K+imatrix"),
                      None)
        ratio = f"{r['kld_mean'] / anchor['kld_mean']:.2f}" if anchor else ""
        same = same_types_anchor(r, results)
        same_ratio = f"{r['kld_mean'] / same['kld_mean']:.2f}" if same else ""
        lines.append(f"| {r['model']} | {r['row']} | {r['file_bytes'] / 2**20:.1f} | {r['bpw']:.3f} | "
                     f"{r['ppl']:.3f} | {r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {100 * r['same_top']:.1f}% | "
                     f"{ratio} | {same_ratio} |")
    lines += ["", "Targets (issue 5): a twinquant file no larger than Q2_K + imatrix with mean KLD <= 0.6x of it; "
              "and one at most 0.75x its size with no higher KLD. Size = tensor data, as llama.cpp reports model "
              "size (files differ by a few hundred bytes of metadata: twinquant.* keys, imatrix provenance).", ""]
    for m in dict.fromkeys(r["model"] for r in results):
        anchor = next((x for x in results if x["model"] == m and x["row"] == "llama.cpp:Q2_K+imatrix"), None)
        ours = [x for x in results if x["model"] == m and x["row"].startswith("twinquant:")]
        if anchor is None or not ours:
            continue
        fit = [x for x in ours if x["tensor_bytes"] <= anchor["tensor_bytes"]]
        best = min(fit, key=lambda x: x["kld_mean"]) if fit else None
        small = [x for x in ours if x["tensor_bytes"] <= 0.75 * anchor["tensor_bytes"]]
        best_small = min(small, key=lambda x: x["kld_mean"]) if small else None
        a = (f"best at <= {anchor['tensor_bytes'] / 2**20:.1f} MiB of tensors: {best['row']} KLD {best['kld_mean']:.4f} = "
             f"{best['kld_mean'] / anchor['kld_mean']:.2f}x ({'met' if best['kld_mean'] <= 0.6 * anchor['kld_mean'] else 'missed'})"
             if best else "no twinquant file that small")
        b = (f"best at <= 0.75x: {best_small['row']} KLD {best_small['kld_mean']:.4f} "
             f"({'met' if best_small['kld_mean'] <= anchor['kld_mean'] else 'missed'})" if best_small
             else "no twinquant file at <= 0.75x the size (missed)")
        lines.append(f"- {m}: {a}; {b}")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    colors = {"llama.cpp": "tab:blue", "twinquant": "tab:red", "autoround": "tab:green"}
    for ax, m in zip(axes[0], models):
        for r in (x for x in results if x["model"] == m):
            kind = r["row"].split(":")[0]
            x, y = r["file_bytes"] / 2**20, r["kld_mean"]
            ax.scatter(x, y, color=colors.get(kind, "gray"), s=25)
            ax.annotate(r["row"].split(":", 1)[1], (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_title(m)
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel("mean KLD vs F16 reference (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()]
    axes[0][0].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def results_header(title: str, prov: dict, inputs: dict) -> str:
    """The markdown head of a results file: command, commit, tool versions, machine, input hashes."""
    v = prov["versions"]
    return (f"# {title}\n\ncommand: `{prov['command']}`  \ncommit {prov['commit']}; llama.cpp {prov['llama_cpp']}; "
            f"twinquant {v['twinquant']}, torch {v['torch']}, gguf {v['gguf']}; {prov['machine']['cpu']}, "
            f"{prov['machine']['cores']} cores  \ninputs (sha256): "
            + "; ".join(f"{m}: " + ", ".join(f"{k} {(x['sha256'] if isinstance(x, dict) else x)[:12]}"
                                             for k, x in d.items() if isinstance(x, str) or "sha256" in x)
                        for m, d in inputs.items()) + "\n\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--text", default="wiki", help="evaluation text: wiki (wiki.test.raw), code (this repository's "
                    f"source at {CODE_COMMIT}) or a file")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--llamacpp", nargs="*", default=LLAMACPP_ROWS, help="llama-quantize types, +imatrix")
    ap.add_argument("--twinquant", nargs="*", default=TWINQUANT_ROWS, help="METHOD[+rh|+ro][+pad][@MIX]")
    ap.add_argument("--autoround", nargs="*", default=[], help="AutoRound GGUF formats, e.g. q2_k_s")
    ap.add_argument("--autoround-args", default="", help="extra autoround_gguf.py options, e.g. '--iters 50'")
    ap.add_argument("--imatrix-chunks", type=int, help="llama-imatrix --chunks (default: the whole text)")
    ap.add_argument("--work", help="cache folder (default ~/.cache/twinquant/quality/MODEL)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--force", action="store_true", help="remake and re-evaluate every row")
    args = ap.parse_args()
    stem = "quality" + (f"_{args.tag}" if args.tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = llamacpp_bin()
    rows = ([f"llama.cpp:{r}" for r in args.llamacpp] + [f"twinquant:{r}" for r in args.twinquant]
            + [f"autoround:{r}" for r in args.autoround])
    results, failures, inputs = [], [], {}
    text = eval_text(args.text)
    prov = record(llama_cpp=llamacpp_version(bin_dir), chunks=args.chunks, ctx=512, text=text.name,
                  calibration=CALIB.name, imatrix_chunks=args.imatrix_chunks)

    def write() -> None:      # after every row: an interrupted run keeps what it measured
        (out / f"{stem}.json").write_text(json.dumps({"provenance": prov, "inputs": inputs, "results": results},
                                                     indent=1))

    for m in args.models:
        work = Path(args.work) / m if args.work else Path.home() / ".cache" / "twinquant" / "quality" / m
        b = Bench(m, work, bin_dir, args.chunks, args.threads, args.force, text)
        b.imatrix_chunks = args.imatrix_chunks
        b.autoround_args = args.autoround_args.split()
        b.prepare()
        for row in rows:
            try:
                r = b.evaluate(row)
            except (RuntimeError, subprocess.CalledProcessError) as e:   # one bad row does not lose the others
                failures.append((m, row, str(e).splitlines()[0]))
                log(f"{m}: {row} FAILED: {str(e)[-600:]}")
                continue
            results.append(r)
            log(f"{m}: {row}: {r['file_bytes'] / 2**20:.1f} MiB, bpw {r['bpw']:.2f}, PPL {r['ppl']:.3f}, "
                f"KLD {r['kld_mean']:.4f}, same top {100 * r['same_top']:.1f}%")
            write()
        inputs[m] = b.inputs()
    write()
    md = results_header(f"quality: {', '.join(args.models)}", prov, inputs) + markdown(results, args.chunks, text.name)
    (out / f"{stem}.md").write_text(md)
    plot(results, out / f"{stem}.png")
    print(md)
    for m, row, why in failures:
        print(f"FAILED {m} {row}: {why}")
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}, {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
