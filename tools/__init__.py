"""Command-line tools beside the trainers: the memory planner (`python -m tools.memory`) and the GPU host scripts."""
