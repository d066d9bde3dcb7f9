"""`python -m sim`: plays vLLM against a live LMCache server and checks every byte it gets back."""
