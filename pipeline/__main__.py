import sys

try:  # Ctrl-C while the CLI is still importing (a second or two): nothing has been written yet
    from pipeline.cli import main
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)

main()
