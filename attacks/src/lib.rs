//! # dynrobust-attacks
//!
//! One file per attack family, each opening with its paper:
//! [`deepsloth`] (Hong et al., ICLR 2021), [`gradmdm`] (Pan et al., TPAMI 2023, and GradAuto,
//! ECCV 2022), [`ilfo`] (Haque et al., CVPR 2020), [`pgd`] (FGSM, PGD-L∞/L2, MI-FGSM),
//! [`apgd`] (APGD-CE / APGD-DLR, Croce & Hein, ICML 2020), [`fab`] (FAB / FAB-T, minimum-distortion boundary attack,
//! Croce & Hein, ICML 2020), [`square`] (Square Attack,
//! Andriushchenko et al., ECCV 2020: black-box, no gradients), [`ensemble`] (AutoAttack-style
//! worst case over members),
//! [`transfer`] (surrogate → victim, feature-level PGD), [`mechanism`] (the dynamic-mechanism
//! attack of the seed study, joint and stealthy). [`registry`] builds them by name from JSON
//! overrides of the authors' defaults; [`evaluate::run_attack`] measures a run in the one
//! metrics schema.
//! Attacks see only [`dynrobust_core::DynamicModel`], so they run unchanged on every model
//! family and on defended models.

pub mod apgd;
pub mod deepsloth;
pub mod ensemble;
pub mod evaluate;
pub mod fab;
pub mod gradmdm;
pub mod ilfo;
pub mod losses;
pub mod pgd;
pub mod tanh_box;
pub mod testing;
pub mod mechanism;
pub mod registry;
pub mod square;
pub mod transfer;
