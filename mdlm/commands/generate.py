"""Print (and optionally save) samples of a trained model.

    mdlm generate                                                    # models:/mdlm@current, unconditional
    mdlm generate generate.model=runs/ray/cpu-demo/model generate.prompts='["ROMEO.", "To be"]'
    mdlm generate sampling.sampler=first_hitting sampling.num_samples=8 sampling.length=64 sampling.seed=3
    mdlm generate generate.device=cuda generate.output=samples.json

``generate.*`` says which model and what to continue; the ``sampling`` section says how (sampler, steps,
num_samples per prompt, length, stride, top_p, dtype, seed, and the samplers' own settings).
(``python pipelines/generate.py ...`` is the same command.)
"""

from __future__ import annotations

import json
import sys

from mdlm.cli import config_parser, load_config_or_exit
from mdlm.output import setup_output


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = config_parser(__doc__, default_preset="cpu-ray", prog=prog).parse_args(argv)
    setup_output(verbose=args.verbose)
    config = load_config_or_exit(args.preset, args.overrides)
    gen, sampling = config.generate, config.sampling

    import torch

    from mdlm.modeling import load_pretrained
    from mdlm.storage import write_text_atomic

    if gen.device == "cuda" and not torch.cuda.is_available():
        print("error: generate.device: cuda, but no GPU is visible", file=sys.stderr)
        return 2
    try:
        model = load_pretrained(gen.model, map_location=gen.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: generate.model {gen.model}: {exc}", file=sys.stderr)
        return 2
    samples = []
    try:
        for prompt in gen.prompts or [None]:
            texts = model.generate(prompt, num_samples=sampling.num_samples, length=sampling.length,
                                   **model.sampling_kwargs(sampling))
            samples += [{"prompt": prompt, "text": text} for text in texts]
    except ValueError as exc:  # a setting this model cannot take (a length beyond max_seq_len without stride ...)
        print(f"error: sampling: {exc}", file=sys.stderr)
        return 2
    for i, sample in enumerate(samples):
        print(f"--- sample {i} ---\n{sample['text'].strip()}")
    if gen.output:
        write_text_atomic(gen.output, json.dumps({"model": gen.model, "samples": samples}, indent=2) + "\n")
        print(f"samples: {gen.output}")
    return 0
