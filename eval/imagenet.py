"""ImageNet evaluation of a sweep of compression settings; the same as `tokcomp eval imagenet`.

    python eval/imagenet.py --model deit_small_patch16_224 --pretrained --data ~/imagenet/val \
        --methods tome,pitome --budgets 0.9,0.75,0.6 --limit 5000

Run with --help for every option.
"""

import sys

from tokcomp.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "imagenet", *sys.argv[1:]]))
