"""hpcflow.run: what turns a config into running chains, and the commands around them.

The top layer of the package (nothing below imports it): ``chains`` builds a chain's
:class:`~hpcflow.sampling.updates.Update` from a config.
"""
