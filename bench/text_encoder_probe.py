"""How distinct are the text states of captions that differ in one word? (cosine similarity)

CLIP's default initialisation (token embeddings of std 0.02) against the default models'
(unit-variance words, special tokens at zero), for a fresh encoder of each kind.

    python bench/text_encoder_probe.py
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel

from sdinfer.models.default import architectures as arch

CAPTIONS = {"base": "a large red square in the top left",
            "position": "a large red square in the bottom right",
            "colour": "a large blue square in the top left",
            "kind": "a large red circle in the top left"}


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def main() -> None:
    ids = arch.build_tokenizer()(list(CAPTIONS.values()), padding="max_length",
                                 max_length=arch.MAX_TOKENS, return_tensors="pt").input_ids
    torch.manual_seed(0)
    encoders = {"CLIP init (std 0.02)": CLIPTextModel(arch.text_encoder_config()),
                "default-model init": arch.build_text_encoder(0)}
    print("| encoder | pooled: position word | pooled: colour word | pooled: kind word | "
          "state of the changed word: position | colour | kind |")
    print("|---|---|---|---|---|---|---|")
    word = {"position": slice(7, 9), "colour": slice(3, 4), "kind": slice(4, 5)}
    for name, enc in encoders.items():
        with torch.no_grad():
            out = enc(ids)
        pooled, states = out.pooler_output, out.last_hidden_state
        cells = [f"{cosine(pooled[0], pooled[i]):.3f}" for i in (1, 2, 3)]
        cells += [f"{cosine(states[0, word[k]], states[i, word[k]]):.3f}"
                  for i, k in ((1, "position"), (2, "colour"), (3, "kind"))]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
