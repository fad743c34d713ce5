"""Model backends behind one interface (base.py): mindone on MindSpore, diffusers on torch; one module each."""
