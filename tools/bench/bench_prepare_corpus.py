"""Throughput of tools/prepare_corpus.py, one process against all cores.

    python tools/bench/bench_prepare_corpus.py [--size_mb=110] [--workers=N] [--rounds=R]

Generates a synthetic Japanese-like corpus in a temporary directory: documents
assembled from template sentences with random slot fillers (so they are
distinct, as real documents are), plus exact duplicates, near-duplicates
(a few characters changed), repetitive spam and short or English pages. It
then runs the tool with --num_workers=1 and with N workers, checks that both
outputs are identical, and prints documents/s, MB/s and the speedup.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "prepare_corpus.py"

TEMPLATES = [
    "{time}、{person}は{place}で{thing}を{verb}。",
    "{place}には{adj}{thing}があり、{season}になると多くの人が訪れます。",
    "{person}によると、{topic}はこの{years}年で大きく変わったそうです。",
    "{topic}について調べてみると、{adj}資料が{place}に残されていることがわかりました。",
    "{season}の{place}は、{adj}景色が広がっていて、歩いているだけで気持ちが落ち着きます。",
    "最近は{topic}に関心を持つ人が増え、{place}でも{event}が開かれるようになりました。",
    "{person}は「{thing}を{verb}のが一番の楽しみです」と話していました。",
    "{time}に{place}へ行くと、{person}が{thing}を{verb}姿をよく見かけます。",
    "{topic}を学ぶには、まず身近な{thing}から始めるのがよいと言われています。",
    "{event}には約{count}人が参加し、{place}はいつもよりにぎやかでした。",
    "{years}年前に始まった{event}は、今では{place}の{adj}行事として親しまれています。",
    "私は{time}になると、{place}の近くで{thing}を{verb}ことにしています。",
]
SLOTS = {
    "time": ["朝早く", "昼休み", "夕方", "日曜日の午後", "仕事の帰り", "雨の日", "夏休みの間", "冬の夜",
             "毎週末", "連休の初日"],
    "person": ["近所のおばあさん", "高校の先生", "駅前の店主", "私の姉", "地元の農家の方", "図書館の職員",
               "大学の研究者", "古くからの友人", "町内会の会長", "若い料理人"],
    "place": ["川沿いの公園", "駅前の商店街", "山のふもとの村", "港の近くの市場", "古い神社", "町の図書館",
              "海辺の小道", "郊外の畑", "大学のキャンパス", "駅の裏の路地"],
    "thing": ["季節の野菜", "古い写真", "手作りのパン", "地域の歴史", "小さな花", "昔の地図", "木の器",
              "地元の新聞", "手紙", "お茶"],
    "verb": ["集めています", "眺めています", "売っています", "育てています", "紹介しています", "記録しています",
             "味わっています", "探しています", "守っています", "作っています"],
    "adj": ["めずらしい", "美しい", "落ち着いた", "にぎやかな", "懐かしい", "素朴な", "大切な", "静かな",
            "新しい", "おだやかな"],
    "season": ["春", "初夏", "梅雨", "真夏", "秋", "晩秋", "冬", "年の瀬"],
    "topic": ["地域の農業", "町の交通", "子どもの読書", "伝統工芸", "防災の取り組み", "商店街の活性化",
              "川の環境", "食文化", "観光", "地元の方言"],
    "event": ["朝市", "写真展", "清掃活動", "音楽会", "勉強会", "収穫祭", "お祭り", "講演会"],
}
SPAM_PHRASES = ["今だけ半額！", "激安セール中！", "送料無料です！", "お得なクーポン！"]
ENGLISH = ("This page is available in English only. Please check the schedule before you visit, "
           "and contact the office if you have any questions about the event. ")


def sentence(rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    fill = {k: rng.choice(v) for k, v in SLOTS.items()}
    fill.update(years=rng.randint(2, 80), count=rng.randint(20, 5000))
    return template.format(**fill)


def document(rng: random.Random) -> str:
    paragraphs = ["".join(sentence(rng) for _ in range(rng.randint(3, 8)))
                  for _ in range(rng.randint(2, 6))]
    return "\n".join(paragraphs)


def edit_chars(rng: random.Random, text: str, n: int) -> str:
    chars = list(text)
    for _ in range(n):
        chars[rng.randrange(len(chars))] = rng.choice("あいうえおかきくけこ")
    return "".join(chars)


def generate(directory: Path, size_mb: float, files: int = 8, seed: int = 0) -> dict:
    rng = random.Random(seed)
    target = size_mb * 1e6
    written = 0
    recent: list[str] = []
    kinds = {"plain": 0, "exact_copy": 0, "near_copy": 0, "spam": 0, "short_or_english": 0}
    outs = [open(directory / f"part-{i:02d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    n = 0
    while written < target:
        roll = rng.random()
        if roll < 0.05 and recent:
            kind, text = "exact_copy", rng.choice(recent)
        elif roll < 0.10 and recent:
            kind, text = "near_copy", edit_chars(rng, rng.choice(recent), 3)
        elif roll < 0.13:
            kind, text = "spam", rng.choice(SPAM_PHRASES) * rng.randint(30, 80)
        elif roll < 0.15:
            kind, text = "short_or_english", rng.choice([sentence(rng), ENGLISH * 4])
        else:
            kind, text = "plain", document(rng)
            recent.append(text)
            if len(recent) > 2000:
                recent.pop(rng.randrange(len(recent)))
        kinds[kind] += 1
        line = json.dumps({"id": f"doc-{n}", "text": text}, ensure_ascii=False) + "\n"
        outs[n % files].write(line)
        written += len(line.encode("utf-8"))
        n += 1
    for f in outs:
        f.close()
    return {"documents": n, "bytes": written, "kinds": kinds}


def run_tool(inputs: str, out: Path, workers: int) -> dict:
    # Other processes on the machine distort the speedup; show how busy it was.
    print(f"running with {workers} worker(s); load average before: {os.getloadavg()[0]:.2f}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, str(TOOL), f"--input={inputs}", f"--output_dir={out}",
                    f"--num_workers={workers}", "--no_progress"], check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    # CPU time of the tool and its workers: unlike wall time, barely affected
    # by other load on the machine.
    report["cpu_seconds"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return report


def output_digest(out: Path) -> str:
    h = hashlib.sha256()
    for shard in sorted(out.glob("shard-*")):
        h.update(shard.read_bytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size_mb", type=float, default=110.0)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=1, help="runs per worker count; the fastest is shown")
    p.add_argument("--tmp_dir", default=None, help="where to generate the corpus (default: system temp)")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_prepare_corpus-", dir=args.tmp_dir))
    try:
        (root / "raw").mkdir()
        t = time.time()
        corpus = generate(root / "raw", args.size_mb)
        print(f"generated {corpus['documents']:,} documents, {corpus['bytes'] / 1e6:.1f} MB "
              f"in {time.time() - t:.1f} s: {corpus['kinds']}")
        best: dict[int, dict] = {}
        digests = set()
        # Alternating rounds and keeping the fastest of each damps the effect
        # of other jobs on a shared machine.
        for _ in range(args.rounds):
            for workers in (1, args.workers):
                out = root / f"out-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                report = run_tool(str(root / "raw" / "*.jsonl"), out, workers)
                digests.add(output_digest(out))
                if workers not in best or report["elapsed_seconds"] < best[workers]["elapsed_seconds"]:
                    best[workers] = report
        rows = sorted(best.items())
        base = rows[0][1]["elapsed_seconds"]
        print("\n| workers | seconds | documents/s | MB/s | speedup | CPU s, all processes "
              "| CPU s, main process | peak RSS, main process |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for workers, r in rows:
            s = r["elapsed_seconds"]
            print(f"| {workers} | {s:.1f} | {r['lines_read'] / s:,.0f} | {r['bytes_in'] / s / 1e6:.2f} "
                  f"| {base / s:.2f}x | {r['cpu_seconds']:.1f} | {r['main_cpu_seconds']:.1f} "
                  f"| {r['peak_rss_mb']:.0f} MB |")
        r = rows[0][1]
        print(f"\ndocuments in {r['documents_in']:,}, out {r['documents_out']:,}; removed {r['removed']}")
        print("outputs identical across runs and worker counts:", len(digests) == 1)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
