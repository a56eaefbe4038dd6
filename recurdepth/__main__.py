from recurdepth.cli import run

if __name__ == "__main__":  # the guard matters: dist_checkpointing starts a spawn-context Manager
    run()
