"""Text-to-image samples of Stable Diffusion v1-4 (PLMS-50, guidance 7.5).

Command (SD v1-4's single-file checkpoint and its tokenizer folder, vocab.json + merges.txt):
  python -m experiments.convert --layout compvis --setting sd --src sd-v1-4.ckpt \
      --tokenizer stable-diffusion-v1-4/tokenizer --dst runs/models/sd-v1-4
  python -m experiments.sample --config configs/sd/sample.py --workdir runs/sd \
      --config.model.source=runs/models/sd-v1-4 --config.guidance.prompts_file=prompts.txt
``:smoke``: a random model of the same architecture at reduced width and a tiny
character-level vocabulary, with configs/sd/smoke_prompts.txt.

The paper's setting (docs/semantics.md §5.1, §6): PLMS with 50 steps (51 evaluations), LDM
grid, guidance 7.5 with the empty prompt's encoding as the unconditional context, KL-f8
latents 4×64×64 (scaling factor 0.18215), 5,000 MS-COCO prompts (one per line in the
prompts file; sample i takes prompt i mod the prompt count); IEC at the first step only
(--config.iec.preset=official_ldm --config.iec.steps=first --config.iec.first_k=1).
Paper (MS-COCO, W8A8 + cache): N = 10 FID 23.65 -> 23.36 with IEC; N = 5 23.74 -> 22.83.
"""

import os

from configs.base import latent_sampling_config, latent_smoke

SMOKE_PROMPTS = os.path.join("configs", "sd", "smoke_prompts.txt")


def get_config(arg=None):
    c = latent_sampling_config("sd", source="runs/models/sd-v1-4", method="plms", num_steps=50,
                               scale=7.5)
    c.guidance.prompts_file = "prompts.txt"
    if arg == "smoke":
        latent_smoke(c)
        c.guidance.prompts_file = SMOKE_PROMPTS
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return c
