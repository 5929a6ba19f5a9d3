"""mxsync: repatriate synchrotron experiments (EPNs) into HPC project folders."""

__version__ = "2.0.0"
