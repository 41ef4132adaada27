import sys

try:
    from .cli import main
except KeyboardInterrupt:   # Ctrl-C while torch imports: one line, as later
    print("mmapload: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
