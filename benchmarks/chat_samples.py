"""Topic accuracy and headline ROUGE-L per model from `alambic eval-chat --samples` files of the chat benchmark.

The records with ``options`` in the data file are topic questions (scored as eval-chat's ``accuracy``), the others
headlines (ROUGE-L alone); the samples are in the data file's order. Prints each model, then mean +- sd over the
models named GROUP-sN:

    python benchmarks/chat_samples.py --data runs/chat/data/test.jsonl runs/chat/full-test/a-answers.jsonl \
        runs/chat/full-test/b-answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics

from alambic.evaluation.chat import answer_matches, rouge_l


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", nargs="+", help="eval-chat --samples files over --data")
    parser.add_argument("--data", required=True, help="the chat file the samples answer")
    parser.add_argument("--reference", metavar="NAME",
                        help="also count, for every other model, the answers identical to NAME's (an export against "
                             "its PyTorch source)")
    args = parser.parse_args()
    records = [json.loads(line) for line in open(args.data, encoding="utf-8")]
    scores: dict[str, dict[str, list[float]]] = {}
    answers: dict[str, list[str]] = {}
    for path in args.samples:
        for record, line in zip(records, open(path, encoding="utf-8")):
            sample = json.loads(line)
            for name, answer in sample["answers"].items():
                answers.setdefault(name, []).append(answer)
                own = scores.setdefault(name, {"topic": [], "headline": []})
                if "options" in record:
                    own["topic"].append(answer_matches(answer, sample["gold"]))
                else:
                    own["headline"].append(rouge_l(answer, sample["gold"]))
    rows = {name: (100 * statistics.mean(s["topic"]), statistics.mean(s["headline"]), len(s["topic"]),
                   len(s["headline"])) for name, s in scores.items()}
    for name, (topic, headline, n_topic, n_headline) in rows.items():
        print(f"{name}: topic accuracy {topic:.1f}% ({n_topic}), headline ROUGE-L {headline:.4f} ({n_headline})")
    if args.reference:
        if args.reference not in answers:
            parser.error(f"--reference {args.reference}: no such model in the samples ({', '.join(answers)})")
        theirs = answers[args.reference]
        for name, ours in answers.items():
            if name != args.reference:
                same = sum(a == b for a, b in zip(ours, theirs))
                print(f"{name}: {same} of {len(theirs)} answers identical to {args.reference}'s")
    groups: dict[str, list[str]] = {}
    for name in rows:
        if "-s" in name:
            groups.setdefault(name.rsplit("-s", 1)[0], []).append(name)
    for group, names in groups.items():
        if len(names) > 1:
            topic, headline = ([rows[n][i] for n in names] for i in (0, 1))
            print(f"{group} (n={len(names)}): topic accuracy {statistics.mean(topic):.1f} ± {statistics.stdev(topic):.1f}%, "
                  f"headline ROUGE-L {statistics.mean(headline):.3f} ± {statistics.stdev(headline):.3f}")


if __name__ == "__main__":
    main()
