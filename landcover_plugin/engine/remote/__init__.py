"""Training on another machine (a GPU host) over SSH: the connection (ssh.py), the
engine's install there (setup.py), files up and models back (transfer.py), the host's
side of a job (host.py, run there) and this machine's side (client.py)."""
