"""Login-node side of fm9g-launch: config, plan, executors, supervisor, CLI and TUI.

Importing this package must stay cheap: no torch, no textual at import time.
"""
