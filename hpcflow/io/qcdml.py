"""QCDml metadata documents for ILDG: the ensemble XML and the configuration XML.

The International Lattice Data Grid describes an ensemble (a Markov chain) by a QCDml
*ensemble* document (root ``markovChain``, namespace :data:`ENSEMBLE_NS`) and every
configuration file by a QCDml *configuration* document (root ``gaugeConfiguration``,
namespace :data:`CONFIG_NS`), both uploaded to the metadata catalogue next to the binary
files. hpcflow writes QCDml 2.0 (schemas ``QCDmlEnsemble2.0.0.xsd``, ``QCDmlConfig2.0.0.xsd``),
every element the schemas require and, in that order:

* configuration: ``dataLFN``; ``management/archiveHistory/archiveEvent`` (``generate``,
  participant, date); ``implementation`` (machine, code); ``algorithm/parameters``;
  ``precision`` (single/double); ``markovSequence`` (``markovChainURI``, ``series`` = chain,
  ``markovStep/update`` = the chain step, ``record``: ``field`` su3gauge, ``crcCheckSum`` =
  POSIX ``cksum`` CRC of the ``ildg-binary-data`` payload, ``avePlaquette`` = Re tr P / 3
  averaged, 1 for the unit field);
* ensemble: ``markovChainURI``; ``management`` (collaboration, project, empty archive
  history); ``license``; ``physics`` (``size`` x y z t, ``plaquetteGluonAction`` with SU(3),
  fundamental, periodic boundaries and beta); ``algorithm`` (name, glossary, reference,
  ``exact`` true, ``reweightingNeeded`` false: every hpcflow chain is an exact Markov chain).

What the ensemble files do not record (collaboration, project, licence, who generated the
data and where) is written as ``unknown``/a placeholder licence text: fill it in before an
upload. The documents are well-formed XML in the QCDml namespaces; they are not validated
against the XSD here (no schema validator is a dependency).
"""

from __future__ import annotations

import datetime
import getpass
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CONFIG_NS", "ENSEMBLE_NS", "UNKNOWN", "config_xml", "ensemble_xml", "xml_datetime"]

CONFIG_NS = "http://www.lqcd.org/ildg/QCDml/config2.0"
ENSEMBLE_NS = "http://www.lqcd.org/ildg/QCDml/ensemble2.0"
UNKNOWN = "unknown"

# the generating algorithm of an hpcflow chain: QCDml name (xs:Name), glossary URI, reference
_ALGORITHMS: dict[str, tuple[str, str, str]] = {
    "hmc": ("HMC", "https://doi.org/10.1016/0370-2693(87)91197-X",
            "S. Duane, A. D. Kennedy, B. J. Pendleton, D. Roweth, Phys. Lett. B 195 (1987) 216"),
    "heatbath": ("heatbathOverrelaxation", "https://doi.org/10.1016/0370-2693(82)90696-7",
                 "N. Cabibbo, E. Marinari, Phys. Lett. B 119 (1982) 387 (SU(2) subgroup heat bath)"),
    "flow": ("flowIndependenceMetropolis", "https://arxiv.org/abs/2008.05456",
             "D. Boyda et al., Phys. Rev. D 103 (2021) 074504 (gauge-equivariant flows, "
             "independence Metropolis)"),
    "mixed": ("flowMixedChain", "https://arxiv.org/abs/2008.05456",
              "D. Boyda et al., Phys. Rev. D 103 (2021) 074504 (flow proposals mixed with HMC/heat bath)"),
}
_WILSON_GLOSSARY = "https://doi.org/10.1103/PhysRevD.10.2445"  # K. G. Wilson, Phys. Rev. D 10 (1974) 2445


def xml_datetime(when: datetime.datetime | None = None) -> str:
    """An ``xs:dateTime`` with its UTC offset, e.g. ``2025-01-31T12:00:00+00:00``."""
    when = when or datetime.datetime.now(datetime.UTC)
    return when.replace(microsecond=0).isoformat()


def _sub(parent: ET.Element, tag: str, text: Any = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
    return el


def _doc(root: ET.Element) -> bytes:
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


def _participant(parent: ET.Element, name: str | None, institution: str | None) -> None:
    p = _sub(parent, "participant")
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):  # no login name (containers without a passwd entry)
            name = UNKNOWN
    _sub(p, "name", name)
    _sub(p, "institution", institution or UNKNOWN)


def _parameters(parent: ET.Element, params: Mapping[str, Any]) -> None:
    ps = _sub(parent, "parameters")
    for k, v in params.items():
        if v is None:
            continue
        p = _sub(ps, "parameter")
        _sub(p, "name", k)
        _sub(p, "value", v)


def config_xml(*, lfn: str, markov_chain_uri: str, series: int | str, update: int, crc: int,
               plaquette: float, precision: int, code_version: str, parameters: Mapping[str, Any],
               field: str = "su3gauge", date: str | None = None, participant: str | None = None,
               institution: str | None = None) -> bytes:
    """The QCDml 2.0 configuration document (``gaugeConfiguration``) of one ILDG file."""
    root = ET.Element("gaugeConfiguration", {"xmlns": CONFIG_NS})
    _sub(root, "dataLFN", lfn)
    ev = _sub(_sub(_sub(root, "management"), "archiveHistory"), "archiveEvent")
    _sub(ev, "revision", 0)
    _sub(ev, "revisionAction", "generate")
    _participant(ev, participant, institution)
    _sub(ev, "date", date or xml_datetime())
    impl = _sub(root, "implementation")
    mach = _sub(impl, "machine")
    for tag in ("name", "institution", "machineType"):  # not recorded in the ensemble files
        _sub(mach, tag, UNKNOWN)
    code = _sub(impl, "code")
    _sub(code, "name", "hpcflow")
    _sub(code, "version", code_version or UNKNOWN)
    _sub(code, "date", date or xml_datetime())
    _parameters(_sub(root, "algorithm"), parameters)
    _sub(root, "precision", "double" if precision == 64 else "single")
    seq = _sub(root, "markovSequence")
    _sub(seq, "markovChainURI", markov_chain_uri)
    _sub(seq, "series", series)
    step = _sub(seq, "markovStep")
    _sub(step, "update", update)
    rec = _sub(step, "record")
    _sub(rec, "field", field)
    _sub(rec, "crcCheckSum", int(crc))
    _sub(rec, "avePlaquette", repr(float(plaquette)))
    return _doc(root)


def ensemble_xml(*, markov_chain_uri: str, size: Sequence[int], beta: float, algorithm: str,
                 parameters: Mapping[str, Any], collaboration: str | None = None,
                 project: str | None = None, gauge_group: str = "SU(3)") -> bytes:
    """The QCDml 2.0 ensemble document (``markovChain``) of an hpcflow chain.

    ``size``: the extents (x, y, z, t); ``algorithm``: hpcflow's ``hmc``/``heatbath``/``flow``/
    ``mixed`` (QCDml name, glossary and reference from :data:`_ALGORITHMS`)."""
    lx, ly, lz, lt = (int(n) for n in size)
    root = ET.Element("markovChain", {"xmlns": ENSEMBLE_NS})
    _sub(root, "markovChainURI", markov_chain_uri)
    man = _sub(root, "management")
    _sub(man, "collaboration", collaboration or UNKNOWN)
    _sub(man, "projectName", project or UNKNOWN)
    _sub(man, "archiveHistory")  # archiveEvent 0..n: the catalogue adds "add" on upload
    lic = _sub(root, "license")
    _sub(lic, "customLicenseText", "not recorded by hpcflow: state the collaboration's licence before upload")
    phys = _sub(root, "physics")
    sz = _sub(phys, "size")
    for tag, n in (("x", lx), ("y", ly), ("z", lz), ("t", lt)):
        _sub(sz, tag, n)
    act = _sub(_sub(_sub(phys, "action"), "gluon"), "plaquetteGluonAction")
    _sub(act, "glossary", _WILSON_GLOSSARY)
    gf = _sub(act, "gluonField")
    _sub(gf, "gaugeGroup", gauge_group)
    _sub(gf, "representation", "fundamental")
    bc = _sub(gf, "boundaryCondition")
    for tag in ("x", "y", "z", "t"):
        _sub(bc, tag, "periodic")
    _sub(act, "beta", repr(float(beta)))
    name, glossary, ref = _ALGORITHMS.get(str(algorithm), (f"hpcflow_{algorithm}", "https://arxiv.org/abs/2003.06413",
                                                           "hpcflow (see the ensemble's config_yaml attribute)"))
    alg = _sub(root, "algorithm")
    _sub(alg, "name", name)
    _sub(alg, "glossary", glossary)
    _sub(alg, "reference", ref)
    _sub(alg, "exact", "true")
    _sub(alg, "reweightingNeeded", "false")
    params = {k: v for k, v in parameters.items() if v is not None}
    if params:  # parametersType: one parameter or more
        _parameters(alg, params)
    return _doc(root)
