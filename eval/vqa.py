"""VQA evaluation of a sweep of visual-token pruning settings; the same as `tokcomp eval vqa`.

    python eval/vqa.py --data easy-vqa --methods zoo,divprune,fastv,visionzip,random \
        --budgets 0.5,0.25,0.125 --limit 1000

evaluates the offline default model (eval/models/vlm-easyvqa; --model DIR for another local
Hugging Face VLM). Run with --help for every option.
"""

import sys

from tokcomp.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "vqa", *sys.argv[1:]]))
