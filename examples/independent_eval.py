"""Score a saved prompt-tuning artifact without softprompt: only its two files, transformers and safetensors.

It rebuilds the model input as explicit `inputs_embeds = cat(P, E)` and scores each label word by the summed
log-probabilities of its tokens, so its accuracy cross-checks `softprompt eval` (which uses the K/V prefix path).

    python examples/independent_eval.py runs/demo/prompt runs/demo/data/test.jsonl MODEL_DIR

MODEL_DIR is a Hugging Face model folder (for the embedded default: ~/.cache/softprompt/smollm2-135m).
"""

import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(prompt_dir: str, data_file: str, model_dir: str) -> None:
    config = json.loads((Path(prompt_dir) / "config.json").read_text())
    prompt = load_file(Path(prompt_dir) / "prompt.safetensors")["prompt_embeddings"]  # (n, hidden)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    embed = model.get_input_embeddings()
    label_ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in config["labels"]]
    records = [json.loads(line) for line in Path(data_file).read_text().splitlines() if line.strip()]
    correct = 0
    with torch.no_grad():
        for record in records:
            text = re.sub(r"\{(\w+)\}", lambda m: str(record[m.group(1)]), config["template"])
            input_ids = tokenizer(text)["input_ids"]
            scores = []
            for ids in label_ids:
                tokens = torch.tensor([input_ids + ids])
                embeddings = torch.cat([prompt[None], embed(tokens)], dim=1)  # (1, n + length, hidden)
                logprobs = model(inputs_embeds=embeddings).logits[0].log_softmax(-1)
                # the token at sequence position t is predicted by the logits at t - 1
                first = prompt.shape[0] + len(input_ids)
                scores.append(sum(float(logprobs[first + j - 1, t]) for j, t in enumerate(ids)))
            gold = str(record[config["label_field"]])
            gold = config["labels"].index(gold) if gold in config["labels"] else int(gold)
            correct += int(max(range(len(scores)), key=scores.__getitem__) == gold)
    print(json.dumps({"accuracy": correct / len(records), "n": len(records)}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
