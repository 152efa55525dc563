"""``python -m services.poolmgr``."""

from services.poolmgr.app import main

if __name__ == "__main__":
    main()
