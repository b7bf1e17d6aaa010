"""VQA evaluation of a sweep of visual-token pruning settings; the same as `tokcomp eval vqa`.

    python eval/vqa.py --data easy-vqa --methods zoo,divprune,fastv,visionzip,random \
        --budgets 0.5,0.25,0.125 --limit 1000

evaluates the offline default model (eval/models/vlm-easyvqa; --model DIR for another local
Hugging Face VLM). Questions on videos come in a JSON-lines file, one a line, with "video":
[frame paths] in place of "image" (a LLaVA-OneVision or Qwen2-VL model):

    python eval/vqa.py --data clips.jsonl --model DIR --methods divprune,fastvid \
        --budgets 0.5,0.25,0.125 --variant dycoke:k=0.7

Run with --help for every option.
"""

import sys

from tokcomp.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "vqa", *sys.argv[1:]]))
