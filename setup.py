"""Packaging from settings.ini (the nbdev 2 convention); data_manifests/ ships inside the package."""
from configparser import ConfigParser
from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
lib = cfg['lib_name']

setup(
    name=lib.replace('_', '-'),
    version=cfg['version'],
    description=cfg['description'],
    author=cfg['author'],
    license='Apache-2.0',
    python_requires='>=' + cfg['min_python'],
    packages=find_packages(include=[lib, f'{lib}.*']) + [f'{lib}.data_manifests'],
    package_dir={f'{lib}.data_manifests': 'data_manifests'},
    package_data={f'{lib}.data_manifests': ['*.yaml'], lib: ['assets/*', 'assets/*/*']},
    include_package_data=True,
    install_requires=cfg.get('requirements', '').split(),
    extras_require={'dev': cfg.get('dev_requirements', '').split()},
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(), 'nbdev': [f'{lib}={lib}._modidx:d']},
    zip_safe=False,
)
