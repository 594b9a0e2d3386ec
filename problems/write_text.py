"""Write the generated demo text (deterministic) to a file:

    python -m problems.write_text --write data/generated.txt --bytes 100000
"""
import argparse
import sys

from problems.text import write_generated_text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the generated demo text (deterministic: the "
                                "same bytes for the same --bytes and --seed).")
    p.add_argument("--write", required=True, metavar="FILE", help="where to write it")
    p.add_argument("--bytes", type=int, default=100_000, help="its size in bytes")
    p.add_argument("--seed", type=int, default=0, help="the grammar's random seed")
    args = p.parse_args(argv)
    if args.bytes < 1:
        p.error(f"--bytes must be a positive integer, got {args.bytes}")
    write_generated_text(args.write, args.bytes, args.seed)
    print(f"wrote {args.bytes:,} bytes of generated text to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
