"""How sharp a run's teacher is on its own records: entropy and top-1 probability at the assistant
tokens, and at the result digits after the first `=` (the tokens a student has to compute).
A teacher near one-hot gives logit KD little beyond the CE on its text (docs/real_demo.md).

Usage: ``OMP_NUM_THREADS=2 python bench/teacher_sharpness.py runs/demo-real [--records 200]``;
prints one JSON line (float64 softmax; the teacher in float32)."""
import argparse
import json
import statistics as st

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--records", type=int, default=200)
    args = ap.parse_args()
    run = args.run_dir
    tok = AutoTokenizer.from_pretrained(f"{run}/teacher")
    model = AutoModelForCausalLM.from_pretrained(f"{run}/teacher", dtype=torch.float32).eval()
    with open(f"{run}/generate/records.jsonl") as fh:
        recs = [json.loads(line) for line in fh][: args.records]
    ents, top1, digit_ents, digit_top1 = [], [], [], []
    with torch.no_grad():
        for r in recs:
            msgs = r["messages"]
            prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            ids = tok(tok.apply_chat_template(msgs, tokenize=False), return_tensors="pt").input_ids
            n_prompt = len(tok(prompt).input_ids)
            # row i predicts assistant token i
            logp = torch.log_softmax(model(ids).logits[0, n_prompt - 1 : -1].double(), -1)
            p = logp.exp()
            entropy = -(p * logp).sum(-1)
            ents += entropy.tolist()
            top1 += p.max(-1).values.tolist()
            pieces = [tok.decode([t]) for t in ids[0, n_prompt:].tolist()]
            eq = next((i for i, piece in enumerate(pieces) if piece == "="), None)
            if eq is None:
                continue
            for j in range(eq + 1, min(eq + 4, len(pieces))):  # the result's sign and digits
                if pieces[j].isdigit() or pieces[j] == "-":
                    digit_ents.append(entropy[j].item())
                    digit_top1.append(p[j].max().item())
    print(json.dumps({
        "run_dir": run, "threads": torch.get_num_threads(), "records": len(recs),
        "assistant_tokens": len(ents), "mean_entropy_nats": round(st.mean(ents), 4),
        "mean_top1_prob": round(st.mean(top1), 4), "result_digit_tokens": len(digit_ents),
        "result_digit_mean_entropy_nats": round(st.mean(digit_ents), 4),
        "result_digit_mean_top1_prob": round(st.mean(digit_top1), 4),
        "share_result_digits_top1_below_0.9": round(sum(x < 0.9 for x in digit_top1) / len(digit_top1), 4)}))


if __name__ == "__main__":
    main()
