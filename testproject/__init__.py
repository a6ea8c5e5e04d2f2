"""The demo project: chat rooms and a cluster dashboard on several daphne nodes."""
