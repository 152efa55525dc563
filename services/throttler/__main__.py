"""``python -m services.throttler``."""

from services.throttler.app import main

if __name__ == "__main__":
    main()
