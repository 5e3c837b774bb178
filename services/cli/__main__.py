"""`python -m services.cli`: the same as `facenet-cli`."""

from services.cli import main

main()
