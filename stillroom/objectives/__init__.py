"""What one training step optimizes: the objectives (core.py) the loop calls, the methods' pieces
they are built from (methods.py), and the rules across config sections (rules.py)."""
