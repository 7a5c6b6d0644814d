"""Stage 3: training. One loop (loop.py) for every strategy; the engine hides the strategy."""
