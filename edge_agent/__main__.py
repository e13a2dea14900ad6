"""`python -m edge_agent` runs the same CLI as the `edge-agent` console script."""
from .cli import main

main(prog_name="edge-agent")
