"""The LAVIS family's tests run in the LAVIS environment (.venv); elsewhere they are skipped."""

from ..conftest import require_family

require_family("lavis", "lavis")
