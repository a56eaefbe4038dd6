from recurdepth.cli import main

if __name__ == "__main__":  # the guard matters: dist_checkpointing starts a spawn-context Manager
    main()
