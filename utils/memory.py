"""`python -m utils.memory` (the memory planner's earlier name) runs `python -m tools.memory`, which it moved to.

Nothing is imported from here: `utils/` is the leaf of the project and the planner needs the model families.
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("tools.memory", run_name="__main__", alter_sys=True)
