"""How clinicians write diagnoses and drugs, as data: abbreviations, lay and eponym forms, spelling variants.

The ICD-10-CM search (``icd10cm``) reads a query through these lists before it looks at the code set, and the drug
lookup (``drugs``) through ``DRUG_ABBREVIATIONS``. Every entry is lowercase and written the way the search
normalises text (punctuation becomes a space: ``a-fib`` is ``a fib``, ``s/p`` is ``s p``).

* ``ABBREVIATIONS``: a phrase (one to four words) -> what it stands for, in the code set's own words where they
  differ from common usage (``cva`` -> ``cerebral infarction``, the ICD-10-CM title; ``ckd`` -> ``chronic kidney
  disease``). Several meanings are tried in order, the first preferred (``ms`` is multiple sclerosis before mitral
  stenosis: in a diagnosis list it usually is).
* ``TOKEN_SYNONYMS``: single words made one on both sides, in the code set and in queries (``renal`` and
  ``kidney``, ``regurgitation`` and ``insufficiency``).
* ``CONTEXT_RULES``: words added (or dropped) when a query leaves out a detail that ICD-10-CM defaults (diabetes
  without a type is type 2, ICD-10-CM guideline I.C.4.a.2) or words it differently ("uncontrolled" diabetes).
* ``WHOLE_QUERY_ONLY``: abbreviations that are also words or units (``mm``, ``add``), read as such only alone.
* ``DRUG_ABBREVIATIONS``: drug abbreviations -> generic names the drug dictionary knows (``hctz``, ``asa``).

Extending: add entries here (and a phrasing to ``bench/data/codes_diagnoses.csv`` that needs it), or at run time
``register({"sob": ("shortness of breath",)})`` / ``register_drug({"nitro": "nitroglycerin"})`` before linking.
The lists are read at query time, so a registration applies at once.
"""

from __future__ import annotations

from typing import Mapping

ABBREVIATIONS: dict[str, tuple[str, ...]] = {
    # cardiovascular
    "htn": ("hypertension",), "hbp": ("hypertension",), "high blood pressure": ("hypertension",),
    "elevated blood pressure": ("hypertension",), "raised blood pressure": ("hypertension",),
    "hld": ("hyperlipidemia",), "dyslipidemia": ("hyperlipidemia",), "high cholesterol": ("hypercholesterolemia",),
    "elevated cholesterol": ("hypercholesterolemia",), "hypercholesterolaemia": ("hypercholesterolemia",),
    "cad": ("coronary artery disease",), "ascvd": ("atherosclerotic cardiovascular disease",),
    "ihd": ("ischemic heart disease",), "chd": ("coronary artery disease", "congenital heart disease"),
    "chf": ("congestive heart failure",), "hf": ("heart failure",), "ccf": ("congestive heart failure",),
    "hfref": ("systolic heart failure",), "hfpef": ("diastolic heart failure",),
    "hfref chronic": ("chronic systolic heart failure",),
    "afib": ("atrial fibrillation",), "a fib": ("atrial fibrillation",), "af": ("atrial fibrillation",),
    "paf": ("paroxysmal atrial fibrillation",), "aflutter": ("atrial flutter",), "a flutter": ("atrial flutter",),
    "afl": ("atrial flutter",), "mi": ("myocardial infarction",), "ami": ("acute myocardial infarction",),
    "heart attack": ("myocardial infarction",), "stemi": ("st elevation myocardial infarction",),
    "nstemi": ("non st elevation myocardial infarction",),
    "old mi": ("old myocardial infarction",), "hx of mi": ("old myocardial infarction",),
    "h o mi": ("old myocardial infarction",),
    "history of mi": ("old myocardial infarction",), "prior mi": ("old myocardial infarction",),
    "acs": ("acute coronary syndrome",),
    "pvd": ("peripheral vascular disease",), "pad": ("peripheral vascular disease",),
    "dvt": ("deep vein thrombosis",), "blood clot in leg": ("deep vein thrombosis",),
    "pe": ("pulmonary embolism",), "vte": ("venous thromboembolism",),
    "svt": ("supraventricular tachycardia",), "vt": ("ventricular tachycardia",), "vtach": ("ventricular tachycardia",),
    "v tach": ("ventricular tachycardia",), "vf": ("ventricular fibrillation",), "vfib": ("ventricular fibrillation",),
    "sss": ("sick sinus syndrome",), "lbbb": ("left bundle branch block",), "rbbb": ("right bundle branch block",),
    "chb": ("complete atrioventricular block",), "ai": ("aortic insufficiency",),
    "mr": ("mitral insufficiency",), "ms": ("multiple sclerosis", "mitral stenosis"),
    "tr": ("tricuspid insufficiency",), "mvp": ("mitral valve prolapse",), "cm": ("cardiomyopathy",),
    "dcm": ("dilated cardiomyopathy",), "hcm": ("hypertrophic cardiomyopathy",),
    "hocm": ("obstructive hypertrophic cardiomyopathy",),
    "aaa": ("abdominal aortic aneurysm",), "tia": ("transient ischemic attack",),
    "mini stroke": ("transient ischemic attack",), "cva": ("cerebral infarction",),
    "stroke": ("cerebral infarction",), "ich": ("intracerebral hemorrhage",), "sah": ("subarachnoid hemorrhage",),
    "pots": ("postural orthostatic tachycardia syndrome",), "brady": ("bradycardia",), "tachy": ("tachycardia",),
    "palps": ("palpitations",), "htn urgency": ("hypertensive urgency",),
    # respiratory
    "copd": ("chronic obstructive pulmonary disease",),
    "aecopd": ("chronic obstructive pulmonary disease with exacerbation",),
    "copd exacerbation": ("chronic obstructive pulmonary disease with exacerbation",),
    "osa": ("obstructive sleep apnea",), "sleep apnoea": ("sleep apnea",),
    "cap": ("pneumonia",), "pna": ("pneumonia",), "hap": ("pneumonia",), "uri": ("upper respiratory infection",),
    "urti": ("upper respiratory infection",), "lrti": ("lower respiratory infection",),
    "ards": ("acute respiratory distress syndrome",), "sob": ("shortness of breath",), "doe": ("dyspnea",),
    "ild": ("interstitial lung disease",), "ipf": ("idiopathic pulmonary fibrosis",), "tb": ("tuberculosis",),
    "rad": ("asthma",), "reactive airway disease": ("asthma",), "ohs": ("obesity hypoventilation syndrome",),
    "pah": ("pulmonary arterial hypertension",), "covid": ("covid 19",), "covid19": ("covid 19",),
    "sars cov 2": ("covid 19",), "rsv": ("respiratory syncytial virus",), "flu": ("influenza",),
    "chest infection": ("lower respiratory infection",), "chest cold": ("acute bronchitis",),
    # kidney and urinary
    "ckd": ("chronic kidney disease",), "esrd": ("end stage renal disease",), "eskd": ("end stage renal disease",),
    "aki": ("acute kidney failure",), "arf": ("acute kidney failure",),
    "acute renal failure": ("acute kidney failure",),
    "acute kidney injury": ("acute kidney failure",), "uti": ("urinary tract infection",),
    "bladder infection": ("cystitis",), "bph": ("benign prostatic hyperplasia",),
    "enlarged prostate": ("benign prostatic hyperplasia",), "ed": ("erectile dysfunction",),
    "kidney stone": ("calculus of kidney",), "kidney stones": ("calculus of kidney",),
    "nephrolithiasis": ("calculus of kidney",), "pyelo": ("pyelonephritis",), "ui": ("urinary incontinence",),
    "oab": ("overactive bladder",), "luts": ("lower urinary tract symptoms",),
    # endocrine and metabolic
    "dm": ("diabetes mellitus",), "t1dm": ("type 1 diabetes mellitus",), "dm1": ("type 1 diabetes mellitus",),
    "dm 1": ("type 1 diabetes mellitus",), "dm type 1": ("type 1 diabetes mellitus",),
    "iddm": ("type 1 diabetes mellitus",),
    "t1d": ("type 1 diabetes mellitus",), "t2dm": ("type 2 diabetes mellitus",), "dm2": ("type 2 diabetes mellitus",),
    "dm 2": ("type 2 diabetes mellitus",), "dm type 2": ("type 2 diabetes mellitus",),
    "t2d": ("type 2 diabetes mellitus",),
    "niddm": ("type 2 diabetes mellitus",), "sugar diabetes": ("diabetes mellitus",),
    "dka": ("diabetes mellitus with ketoacidosis",), "hhs": ("diabetes mellitus with hyperosmolarity",),
    "dfu": ("diabetes mellitus with foot ulcer",), "diabetic foot ulcer": ("diabetes mellitus with foot ulcer",),
    "dpn": ("diabetes mellitus with diabetic polyneuropathy",),
    "hypothyroid": ("hypothyroidism",), "underactive thyroid": ("hypothyroidism",), "low thyroid": ("hypothyroidism",),
    "hyperthyroid": ("hyperthyroidism",), "overactive thyroid": ("hyperthyroidism",), "graves": ("graves disease",),
    "hashimoto": ("hashimoto thyroiditis",), "hashimotos": ("hashimoto thyroiditis",),
    "vit d deficiency": ("vitamin d deficiency",), "vit d def": ("vitamin d deficiency",),
    "vitamin d def": ("vitamin d deficiency",), "b12 deficiency": ("vitamin b12 deficiency",),
    "pcos": ("polycystic ovarian syndrome",), "low potassium": ("hypokalemia",), "low sodium": ("hyponatremia",),
    "high potassium": ("hyperkalemia",), "morbid obesity": ("morbid severe obesity",), "obese": ("obesity",),
    "high blood sugar": ("hyperglycemia",), "low blood sugar": ("hypoglycemia",),
    "hypoglycaemia": ("hypoglycemia",), "hyperglycaemia": ("hyperglycemia",), "hypokalaemia": ("hypokalemia",),
    "hyponatraemia": ("hyponatremia",), "hyperkalaemia": ("hyperkalemia",), "ftt": ("failure to thrive",),
    # digestive
    "gerd": ("gastro esophageal reflux disease",), "gord": ("gastro esophageal reflux disease",),
    "acid reflux": ("gastro esophageal reflux disease",), "reflux": ("gastro esophageal reflux disease",),
    "pud": ("peptic ulcer",), "gib": ("gastrointestinal hemorrhage",),
    "gi bleed": ("gastrointestinal hemorrhage",), "ugib": ("upper gastrointestinal hemorrhage",),
    "lgib": ("lower gastrointestinal hemorrhage",), "ibs": ("irritable bowel syndrome",),
    "ibd": ("inflammatory bowel disease",), "uc": ("ulcerative colitis",), "crohns": ("crohn disease",),
    "crohn": ("crohn disease",), "nafld": ("nonalcoholic fatty liver disease",),
    "masld": ("nonalcoholic fatty liver disease",),
    "nash": ("nonalcoholic steatohepatitis",), "hcv": ("hepatitis c",),
    "hep c": ("hepatitis c",), "hbv": ("hepatitis b",), "hep b": ("hepatitis b",), "sbo": ("intestinal obstruction",),
    "small bowel obstruction": ("intestinal obstruction",), "c diff": ("clostridioides difficile enterocolitis",),
    "cdiff": ("clostridioides difficile enterocolitis",), "n v": ("nausea with vomiting",),
    "nausea and vomiting": ("nausea with vomiting",), "stomach flu": ("gastroenteritis",), "lft": ("liver function",),
    "gallstones": ("calculus of gallbladder",), "gall stones": ("calculus of gallbladder",),
    "cholelithiasis": ("calculus of gallbladder",), "piles": ("hemorrhoids",), "haemorrhoids": ("hemorrhoids",),
    "abd pain": ("abdominal pain",), "abdo pain": ("abdominal pain",), "ruq pain": ("right upper quadrant pain",),
    "rlq pain": ("right lower quadrant pain",), "llq pain": ("left lower quadrant pain",),
    "luq pain": ("left upper quadrant pain",),
    # mental health and neurology
    "mdd": ("major depressive disorder",),
    "gad": ("generalized anxiety disorder",), "adhd": ("attention deficit hyperactivity disorder",),
    "add": ("attention deficit hyperactivity disorder",), "ptsd": ("post traumatic stress disorder",),
    "ocd": ("obsessive compulsive disorder",), "bpad": ("bipolar disorder",), "bipolar": ("bipolar disorder",),
    "aud": ("alcohol dependence",), "etoh abuse": ("alcohol abuse",), "etoh": ("alcohol",),
    "alcoholism": ("alcohol dependence",), "oud": ("opioid dependence",), "smoker": ("nicotine dependence cigarettes",),
    "current smoker": ("nicotine dependence cigarettes",), "tobacco use disorder": ("nicotine dependence",),
    "sz": ("seizure",), "seizure disorder": ("epilepsy",), "szs": ("seizure",), "migraines": ("migraine",),
    "pd": ("parkinson disease",), "parkinsons": ("parkinson disease",), "als": ("amyotrophic lateral sclerosis",),
    "lou gehrig disease": ("amyotrophic lateral sclerosis",), "alzheimers": ("alzheimer disease",),
    "alzheimer": ("alzheimer disease",), "tbi": ("traumatic brain injury",), "ha": ("headache",),
    "ams": ("altered mental status",), "loc": ("loss of consciousness",), "rls": ("restless legs syndrome",),
    "cp": ("chest pain", "cerebral palsy"), "mci": ("mild cognitive impairment",), "bells palsy": ("bell palsy",),
    "peripheral neuropathy": ("polyneuropathy",),
    # musculoskeletal and trauma
    "lbp": ("low back pain",), "djd": ("osteoarthritis",), "oa": ("osteoarthritis",), "ra": ("rheumatoid arthritis",),
    "sle": ("systemic lupus erythematosus",), "lupus": ("systemic lupus erythematosus",), "fm": ("fibromyalgia",),
    "fx": ("fracture",), "broken": ("fracture",), "hip fx": ("fracture of femur neck",),
    "hip fracture": ("fracture of femur neck",),
    "ctd": ("connective tissue disease",), "pmr": ("polymyalgia rheumatica",), "as spine": ("ankylosing spondylitis",),
    "acl tear": ("sprain of anterior cruciate ligament",), "torn acl": ("sprain of anterior cruciate ligament",),
    "acl": ("anterior cruciate ligament",), "mcl": ("medial collateral ligament",),
    "frozen shoulder": ("adhesive capsulitis of shoulder",), "tennis elbow": ("lateral epicondylitis",),
    "golfers elbow": ("medial epicondylitis",),
    # blood and neoplasms
    "ida": ("iron deficiency anemia",), "anaemia": ("anemia",), "itp": ("immune thrombocytopenic purpura",),
    "scd": ("sickle cell disease",), "cll": ("chronic lymphocytic leukemia",), "aml": ("acute myeloblastic leukemia",),
    "cml": ("chronic myeloid leukemia",), "nhl": ("non hodgkin lymphoma",),
    "mm": ("multiple myeloma",), "mgus": ("monoclonal gammopathy",), "ca": ("malignant neoplasm",),
    "cancer": ("malignant neoplasm",), "malignancy": ("malignant neoplasm",), "mets": ("secondary malignant neoplasm",),
    "metastatic": ("secondary malignant neoplasm",), "crc": ("malignant neoplasm of colon",),
    "nsclc": ("malignant neoplasm of lung",), "sclc": ("malignant neoplasm of lung",), "bcc": ("basal cell carcinoma",),
    "scc": ("squamous cell carcinoma",), "tumour": ("neoplasm",), "tumor": ("neoplasm",),
    "thrombocytopaenia": ("thrombocytopenia",), "low platelets": ("thrombocytopenia",),
    # infections, skin, eye, ear, nose, throat
    "strep": ("streptococcal",), "strep pneumo": ("streptococcus pneumoniae",),
    "strep pneumoniae": ("streptococcus pneumoniae",), "s pneumoniae": ("streptococcus pneumoniae",),
    "staph": ("staphylococcal",), "e coli": ("escherichia coli",), "gbs": ("streptococcus group b",),
    "hiv": ("human immunodeficiency virus disease",), "aids": ("human immunodeficiency virus disease",),
    "strep throat": ("streptococcal pharyngitis",), "sore throat": ("pharyngitis",), "om": ("otitis media",),
    "aom": ("acute otitis media",), "ear infection": ("otitis media",), "shingles": ("zoster",),
    "chickenpox": ("varicella",), "chicken pox": ("varicella",), "mono": ("infectious mononucleosis",),
    "cold sore": ("herpesviral vesicular dermatitis",), "mrsa": ("methicillin resistant staphylococcus aureus",),
    "ssti": ("cellulitis",), "pink eye": ("conjunctivitis",), "pinkeye": ("conjunctivitis",),
    "lazy eye": ("amblyopia",), "poag": ("primary open angle glaucoma",), "amd": ("age related macular degeneration",),
    "armd": ("age related macular degeneration",), "ar": ("allergic rhinitis",), "hay fever": ("allergic rhinitis",),
    "bppv": ("benign paroxysmal vertigo",), "ad": ("atopic dermatitis", "alzheimer disease"),
    "bedsore": ("pressure ulcer",), "bed sore": ("pressure ulcer",),
    "decubitus ulcer": ("pressure ulcer",), "pressure sore": ("pressure ulcer",), "acne": ("acne vulgaris",),
    # pregnancy and women's health
    "iup": ("pregnant state",), "pregnancy": ("pregnant state",), "pregnant": ("pregnant state",),
    "gdm": ("gestational diabetes mellitus in pregnancy",), "pih": ("gestational hypertension",),
    "pregnancy induced hypertension": ("gestational hypertension",),
    # findings and general
    "wt loss": ("weight loss",), "weight loss": ("abnormal weight loss",), "sob on exertion": ("dyspnea",),
    "pyrexia": ("fever",), "tiredness": ("fatigue",),
    "dizzy": ("dizziness",), "fainting": ("syncope",), "passed out": ("syncope",), "swelling": ("edema",),
    "oedema": ("edema",), "falls": ("repeated falls",), "frequent falls": ("repeated falls",),
    "hx of falls": ("history of falling",), "malnourished": ("malnutrition",), "dehydrated": ("dehydration",),
    "hx": ("history",), "h o": ("history",), "s p": ("status",), "r o": ("suspected",), "w": ("with",),
    "w o": ("without",), "wo": ("without",), "b l": ("bilateral",), "bilat": ("bilateral",), "lt": ("left",),
    "rt": ("right",), "l": ("left",), "r": ("right",), "leg": ("lower limb",), "legs": ("lower limb",),
    "arm": ("upper limb",), "arms": ("upper limb",), "lower extremity": ("lower limb",), "le": ("lower limb",),
    "upper extremity": ("upper limb",), "ue": ("upper limb",), "bilateral lower extremity": ("bilateral lower limb",),
}

# Words written one way in queries and another in the code set: both sides use the value.
TOKEN_SYNONYMS: dict[str, str] = {
    "renal": "kidney", "nephric": "kidney", "hepatic": "liver", "cardiac": "heart", "regurgitation": "insufficiency",
    "haemorrhage": "hemorrhage", "bleed": "hemorrhage", "bleeding": "hemorrhage", "stones": "calculus",
    "stone": "calculus", "oesophageal": "esophageal", "oesophagitis": "esophagitis", "oedema": "edema",
    "anaemia": "anemia", "leukaemia": "leukemia", "ischaemic": "ischemic", "ischaemia": "ischemia",
    "paediatric": "pediatric", "tumour": "neoplasm", "tumor": "neoplasm", "diarrhoea": "diarrhea",
    "gonorrhoea": "gonorrhea", "haematuria": "hematuria", "faecal": "fecal", "oestrogen": "estrogen",
    "thrombus": "thrombosis", "hypertensive": "hypertension", "autistic": "autism", "torn": "tear",
    "swollen": "swelling", "venous": "vein", "extremity": "limb", "extremities": "limb", "clot": "thrombosis",
    "infarct": "infarction", "hypothyroid": "hypothyroidism", "hyperthyroid": "hyperthyroidism",
    "lungs": "lung", "pulmonary": "lung",
    "intestinal": "intestine", "bowel": "intestine", 
    "diabetic": "diabetes", "asthmatic": "asthma", "arthritic": "arthritis", "septic": "sepsis",
    "abdomen": "abdominal", "belly": "abdominal", "stomach": "gastric", "hemorrhagic": "hemorrhage",
    "psychotic": "psychosis", "neuropathic": "neuropathy", "anxious": "anxiety",
    "epileptic": "epilepsy", "obese": "obesity", "thyroidal": "thyroid",
    "ulceration": "ulcer", "ulcers": "ulcer", "ulcerated": "ulcer", "fractured": "fracture",
    "infected": "infection", "infective": "infection", "infectious": "infection",
}

# Rules on the words of a query (after abbreviations): when it has every word of ``when`` and none of ``unless``,
# ``add`` is added and ``drop`` removed. ICD-10-CM's defaults for a detail left out (diabetes without a type is
# type 2), and phrasings whose words are not the code set's ("uncontrolled" diabetes is diabetes with hyperglycemia).
CONTEXT_RULES: tuple[tuple[frozenset[str], frozenset[str], tuple[str, ...], frozenset[str]], ...] = (
    (frozenset({"diabetes"}), frozenset({"type", "gestational", "insipidus", "drug", "chemical", "secondary",
                                         "pregnancy", "neonatal", "underlying", "prediabetes", "1", "2", "steroid"}),
     ("type", "2"), frozenset()),
    (frozenset({"diabetes",
    "uncontrolled"}), frozenset({"hypoglycemia"}), ("hyperglycemia",), frozenset({"uncontrolled"})),
    (frozenset({"diabetes", "poorly", "controlled"}), frozenset({"hypoglycemia"}), ("hyperglycemia",),
     frozenset({"poorly", "controlled"})),
    (frozenset({"hypertension", "uncontrolled"}), frozenset(), (), frozenset({"uncontrolled"})),
    (frozenset({"migraine", "headache"}), frozenset(), (), frozenset({"headache", "headaches"})),
)

# Words clinicians add that ICD-10-CM does not code (left out of a query: they would only lower every score).
IGNORED_WORDS = frozenset({"rvr", "stable", "controlled", "compensated", "known", "newly", "diagnosed", "noted",
                           "likely", "probable", "possible", "mild", "severe", "moderate", "significant", "worsening",
                           "improving", "resolved", "resolving", "ongoing", "longstanding", "long", "standing"})

# Abbreviations that are also common words or units (``mm``, ``add``): read as abbreviations only when they are
# the whole query.
WHOLE_QUERY_ONLY = frozenset({"mm", "cm", "add", "ed"})

# Drug abbreviations and shorthand -> the generic name the drug dictionary knows.
DRUG_ABBREVIATIONS: dict[str, str] = {
    "hctz": "hydrochlorothiazide", "asa": "aspirin", "apap": "acetaminophen", "mtx": "methotrexate",
    "ntg": "nitroglycerin", "nitro": "nitroglycerin", "kcl": "potassium chloride", "k cl": "potassium chloride",
    "mvi": "multivitamin", "tmp smx": "sulfamethoxazole and trimethoprim",
    "smx tmp": "sulfamethoxazole and trimethoprim",
    "inh": "isoniazid", "5 fu": "fluorouracil", "epo": "epoetin alfa", "pcn": "penicillin",
    "amox": "amoxicillin", "amox clav": "amoxicillin and clavulanate", "augmentin": "amoxicillin and clavulanate",
    "mso4": "morphine", "ms contin": "morphine", "ffp": "plasma", "ppi": "omeprazole", "d5w": "dextrose",
    "ns": "sodium chloride", "normal saline": "sodium chloride", "lr": "lactated ringer's solution",
    "vit d": "cholecalciferol", "vitamin d": "cholecalciferol", "vit d3": "cholecalciferol",
    "vitamin d3": "cholecalciferol", "vit b12": "cyanocobalamin", "vitamin b12": "cyanocobalamin",
    "b12": "cyanocobalamin", "vit c": "ascorbic acid", "vitamin c": "ascorbic acid", "folate": "folic acid",
    "mag ox": "magnesium oxide", "mgso4": "magnesium sulfate", "fe": "ferrous sulfate", "iron": "ferrous sulfate",
    "tpa": "alteplase", "ufh": "heparin", "lmwh": "enoxaparin", "ocp": "ethinyl estradiol",
    "nac": "acetylcysteine", "nicotine patch": "nicotine", "insulin regular": "insulin human",
    # brand names the dictionary lacks or maps to a drug class
    "keflex": "cephalexin", "percocet": "oxycodone and acetaminophen", "norco": "hydrocodone and acetaminophen",
    "vicodin": "hydrocodone and acetaminophen", "lortab": "hydrocodone and acetaminophen",
    "tylenol 3": "acetaminophen and codeine", "tylenol with codeine": "acetaminophen and codeine",
    "imdur": "isosorbide mononitrate", "sinemet": "carbidopa and levodopa", "colace": "docusate",
    "z pak": "azithromycin", "zpak": "azithromycin",
}


def register(entries: Mapping[str, tuple[str, ...] | str]) -> None:
    """Add or replace abbreviations for this process (the lists are read at query time).

    Args:
        entries: phrase (lowercase, punctuation written as spaces) -> its meaning, or several meanings in order.
    """
    for phrase, meaning in entries.items():
        ABBREVIATIONS[phrase.strip().lower()] = (meaning,) if isinstance(meaning, str) else tuple(meaning)


def register_drug(entries: Mapping[str, str]) -> None:
    """Add or replace drug abbreviations for this process.

    Args:
        entries: abbreviation (lowercase) -> generic name as the drug dictionary writes it.
    """
    for abbreviation, generic in entries.items():
        DRUG_ABBREVIATIONS[abbreviation.strip().lower()] = generic.strip().lower()
