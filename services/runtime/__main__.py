"""An instance: ``python -m services.runtime --fd N`` (see :mod:`services.runtime.serve`)."""

from services.runtime.serve import main

if __name__ == "__main__":
    main()
